//! Edges of the contract that the differential suite does not reach (found by mutation testing,
//! docs/MUTATION.md): limits at their exact value, accessors the model has no counterpart for,
//! and the lock ranks of device gates across majors.

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Clock, Engine, EngineConfig, StorageSpec};
use blksnap_model::limits::MAX_RANGES_PER_CALL;
use blksnap_model::{DeviceId, Errno, Params, SectorRange};

const KIB: u64 = 1024;

fn engine() -> Engine {
    Engine::new(EngineConfig::new(Params::small(), Some(1), Clock::manual(true))).unwrap()
}

fn mem(len: u64) -> Dev {
    StdArc::new(MemDev::new(len))
}

fn file_storage() -> StorageSpec {
    StorageSpec::File { backend: StdArc::new(MemDev::growable(0, 1 << 24)), limit_sectors: 1 << 14 }
}

#[test]
fn disk_capacity_is_the_backing_length() {
    let e = engine();
    let d = DeviceId::new(7, 0);
    e.add_disk(d, mem(192 * KIB), 1).unwrap();
    assert_eq!(e.disk_capacity_bytes(d).unwrap(), 192 * KIB);
    let unknown = e.disk_capacity_bytes(DeviceId::new(7, 1)).unwrap_err();
    assert_eq!(unknown.errno, Errno::ENODEV);
}

#[test]
fn cbt_dirty_takes_at_most_max_ranges_per_call() {
    let e = engine();
    let d = DeviceId::new(7, 0);
    e.add_disk(d, mem(64 * KIB), 1).unwrap();
    e.attach(d).unwrap();
    // After a take the read map shows marks (before one, every block reads as unchanged).
    let id = e.snapshot_create(file_storage()).unwrap();
    e.snapshot_add(id, d).unwrap();
    e.snapshot_take(id).unwrap();
    e.snapshot_destroy(id).unwrap();
    let info = e.cbt_info(d).unwrap();
    let read_map = |e: &Engine| {
        let mut map = Vec::new();
        e.cbt_map(d, 0, info.block_count, &mut map).unwrap();
        map
    };
    let clean = read_map(&e);
    let one = SectorRange::new(0, 1);
    let too_many = vec![one; MAX_RANGES_PER_CALL + 1];
    assert_eq!(e.cbt_dirty(d, &too_many).unwrap_err().errno, Errno::EINVAL);
    assert_eq!(read_map(&e), clean, "all-or-nothing: a refused call marks nothing");
    e.cbt_dirty(d, &vec![one; MAX_RANGES_PER_CALL]).unwrap();
    assert_ne!(read_map(&e), clean, "exactly the limit is accepted");
}

/// Gates are an ordered lock family keyed by (major, minor): a take holds the gates of all its
/// members at once, in ascending device order. With devices whose order differs from their
/// minors' order, a key that lost the major would go down and the checked lock order panic.
#[test]
fn a_take_over_two_majors_holds_gates_in_device_order() {
    let e = engine();
    let (a, b) = (DeviceId::new(7, 1), DeviceId::new(8, 0));
    for d in [b, a] {
        e.add_disk(d, mem(64 * KIB), 1).unwrap();
        e.attach(d).unwrap();
    }
    let id = e.snapshot_create(file_storage()).unwrap();
    e.snapshot_add(id, b).unwrap();
    e.snapshot_add(id, a).unwrap();
    e.snapshot_take(id).unwrap();
    e.write(a, 0, &[1; 512]).unwrap();
    e.write(b, 0, &[2; 512]).unwrap();
    let mut buf = [9u8; 512];
    e.image_read(a, 0, &mut buf).unwrap();
    assert_eq!(buf, [0; 512]);
    e.snapshot_destroy(id).unwrap();
}

#[test]
fn flush_reports_the_backing_error() {
    use blksnap_engine::io::{Fault, FaultDev, FaultPlan};
    let e = engine();
    let d = DeviceId::new(7, 0);
    let plan = FaultPlan::shared();
    e.add_disk(d, StdArc::new(FaultDev::new(mem(64 * KIB), plan.clone())), 1).unwrap();
    e.flush(d).unwrap();
    // Pin a fault to the next counted op: the flush.
    plan.fail_at(plan.ops_seen(), Fault::Error(Errno::EIO));
    assert_eq!(e.flush(d).unwrap_err().errno, Errno::EIO, "a failed flush is not durable");
    assert_eq!(plan.faults_fired(), 1);
    e.flush(d).unwrap();
    assert_eq!(e.flush(DeviceId::new(7, 1)).unwrap_err().errno, Errno::ENODEV);
}
