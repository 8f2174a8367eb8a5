//! The daemon simulation (`blksnap_service::sim`, binary `blksnapd-sim`): a few seeds, each run
//! twice (deterministic), and the lifecycle bugs of issue 12 that a host can reproduce as
//! regression cases — a backing written while no daemon ran, a crash, a full disk or a torn
//! file in the state directory: each must end in a new generation, never in a map that misses
//! writes, and leave no stray file — and the restart that keeps the devices (the default): a
//! clean stop leaves the origin devices and no image, the next daemon takes them over, a stale
//! device map never deletes a new device.

use std::path::PathBuf;
use std::sync::Arc;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_model::{DeviceId, Uuid};
use blksnap_proto::{Range, Reply, Request, Role, Storage};
use blksnap_service::config::DeviceConfig;
use blksnap_service::daemon::NullDevices;
use blksnap_service::sim::{self, SimConfig};
use blksnap_service::state::Faults;
use blksnap_service::{Config, Daemon, NullFrontend, StateDir};

#[test]
fn seeds_pass_and_are_deterministic() {
    for seed in 1..=3 {
        let cfg = SimConfig { seed, steps: 800, trace: false };
        let a = sim::run(&cfg).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let b = sim::run(&cfg).unwrap_or_else(|e| panic!("seed {seed}, again: {e}"));
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}: not deterministic");
        assert!(a.restarts > 5 && a.checks > 800, "seed {seed}: {a}");
    }
}

struct Host {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    backings: Vec<PathBuf>,
    faults: Arc<Faults>,
}

fn host(n: usize) -> Host {
    let tmp = tempfile::tempdir().unwrap();
    let backings: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = tmp.path().join(format!("b{i}.img"));
            std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
            p
        })
        .collect();
    Host { state: tmp.path().join("state"), _tmp: tmp, backings, faults: Default::default() }
}

impl Host {
    /// A daemon on the state directory serving every backing (attached), as `blksnapd` starts.
    fn start(&self) -> (Daemon, Vec<DeviceId>) {
        self.start_with(None, false)
    }

    /// As `start`, its devices in `devices` (they outlive the daemon, as ublk devices do), a
    /// clean stop removing them when `remove_on_stop`.
    fn start_with(
        &self,
        devices: Option<&Arc<NullDevices>>,
        remove_on_stop: bool,
    ) -> (Daemon, Vec<DeviceId>) {
        self.faults.reset();
        let cfg = Config {
            state_dir: self.state.clone(),
            freeze: false,
            remove_devices_on_stop: remove_on_stop,
            devices: self
                .backings
                .iter()
                .map(|b| DeviceConfig { backing: b.clone(), attach: true })
                .collect(),
            ..Config::default()
        };
        let sd = StateDir::open_with_faults(&self.state, Some(self.faults.clone())).unwrap();
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        let frontend = match devices {
            Some(devices) => NullFrontend::lasting(Default::default(), devices.clone()),
            None => NullFrontend::default(),
        };
        let d = Daemon::with_state(engine, Box::new(frontend), cfg, sd);
        let ids = d.add_configured().unwrap();
        (d, ids)
    }

    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn generation(d: &Daemon, id: DeviceId) -> Uuid {
    d.engine().cbt_info(id).unwrap().generation_id
}

/// Writes into CBT block `block` (64 KiB blocks) through the engine, as the front end does.
fn write(d: &Daemon, id: DeviceId, block: u64) {
    d.engine().write(id, block << 16, &[7u8; 4096]).unwrap();
}

/// Whether `block` is marked as written since the last take.
fn marked(d: &Daemon, id: DeviceId, block: u64) -> bool {
    let st = d.engine().cbt_export(id).unwrap();
    st.write_map[block as usize] >= st.active
}

#[test]
fn a_clean_gap_keeps_the_generation_and_every_mark() {
    let h = host(2);
    let (d, ids) = h.start();
    let gens: Vec<Uuid> = ids.iter().map(|i| generation(&d, *i)).collect();
    write(&d, ids[0], 3);
    write(&d, ids[1], 60);
    d.shutdown();
    drop(d);
    let (d, ids) = h.start();
    assert_eq!(ids.iter().map(|i| generation(&d, *i)).collect::<Vec<_>>(), gens);
    assert!(marked(&d, ids[0], 3) && marked(&d, ids[1], 60));
    assert_eq!(h.files(), ["devices", "running"], "the saved trackers were consumed");
}

#[test]
fn an_offline_write_starts_a_new_generation() {
    // Issue 12 item 3: a backing written while no daemon served it.
    let h = host(2);
    let (d, ids) = h.start();
    let gens: Vec<Uuid> = ids.iter().map(|i| generation(&d, *i)).collect();
    write(&d, ids[0], 1);
    d.shutdown();
    drop(d);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&h.backings[1]).unwrap();
    f.write_all_at(&[1u8; 512], 5 << 16).unwrap(); // block 5, behind the daemon's back
    drop(f);
    let (d, ids) = h.start();
    assert_eq!(generation(&d, ids[0]), gens[0], "the untouched backing keeps its map");
    assert!(marked(&d, ids[0], 1));
    assert_ne!(generation(&d, ids[1]), gens[1], "the written one must not come back");
    assert_eq!(d.engine().cbt_info(ids[1]).unwrap().changes_number, 0);
}

#[test]
fn a_crash_starts_a_new_generation() {
    let h = host(1);
    let (d, ids) = h.start();
    let g = generation(&d, ids[0]);
    write(&d, ids[0], 2);
    drop(d); // no clean stop: the marker stays
    let (d, ids) = h.start();
    assert_ne!(generation(&d, ids[0]), g);
    assert_eq!(h.files(), ["devices", "running"]);
}

#[test]
fn a_full_disk_at_the_stop_costs_that_device_its_map_and_leaves_no_file() {
    let h = host(2);
    let (d, ids) = h.start();
    let gens: Vec<Uuid> = ids.iter().map(|i| generation(&d, *i)).collect();
    write(&d, ids[0], 4);
    write(&d, ids[1], 4);
    // The stop's changes: the first tracker's file, the second's, the map, the marker.
    h.faults.arm(1, false, 17);
    d.shutdown();
    drop(d);
    let hit = h.faults.hit().expect("the fault was hit");
    assert!(hit.file_name().unwrap().to_string_lossy().starts_with("cbt-"), "{hit:?}");
    assert!(h.files().iter().all(|f| !f.ends_with(".tmp")), "{:?}", h.files());
    assert_eq!(h.files().len(), 1, "one tracker saved: {:?}", h.files());
    let (d, ids) = h.start();
    let now: Vec<Uuid> = ids.iter().map(|i| generation(&d, *i)).collect();
    assert_eq!(now.iter().zip(&gens).filter(|(a, b)| a == b).count(), 1, "one map kept");
    for (i, id) in ids.iter().enumerate() {
        if now[i] == gens[i] {
            assert!(marked(&d, *id, 4), "a kept map marks every write");
        }
    }
}

#[test]
fn a_torn_state_file_is_refused_and_removed() {
    let h = host(1);
    let (d, ids) = h.start();
    let g = generation(&d, ids[0]);
    d.shutdown();
    drop(d);
    let saved: Vec<String> = h.files();
    assert_eq!(saved.len(), 1);
    let path = h.state.join(&saved[0]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (d, ids) = h.start();
    assert_ne!(generation(&d, ids[0]), g);
    assert_eq!(h.files(), ["devices", "running"]);
}

#[test]
fn a_crash_while_writing_the_state_leaves_no_temporary_file() {
    let h = host(2);
    let (d, ids) = h.start();
    let gens: Vec<Uuid> = ids.iter().map(|i| generation(&d, *i)).collect();
    h.faults.arm(1, true, 30); // dies in the middle of the second tracker's file
    d.shutdown();
    drop(d);
    assert!(h.faults.dead());
    assert!(h.files().iter().any(|f| f.ends_with(".tmp")), "a torn temporary: {:?}", h.files());
    assert!(h.files().contains(&"running".to_string()), "the marker stays");
    let (d, ids) = h.start();
    for (i, id) in ids.iter().enumerate() {
        assert_ne!(generation(&d, *id), gens[i], "an unclean stop: new generations");
    }
    assert_eq!(h.files(), ["devices", "running"], "the dead run's temporary is gone");
}

/// The devices that exist, and those the daemon serves (origins and images).
fn devices_of(devices: &NullDevices, d: &Daemon) -> (Vec<DeviceId>, Vec<DeviceId>) {
    let existing: Vec<DeviceId> = devices.list().values().map(|(dev, _)| *dev).collect();
    let mut served: Vec<DeviceId> = d.list().iter().map(|e| e.dev.into()).collect();
    served.sort();
    (existing, served)
}

#[test]
fn a_clean_stop_keeps_the_devices_and_the_next_daemon_takes_them_over() {
    // Issue 12 item 2: a clean stop was worse than a crash (it removed the devices under their
    // mounts). Now it leaves every origin device — never an image: snapshots do not survive a
    // stop — and the next daemon takes each over with the saved CBT.
    let h = host(2);
    let devices = Arc::new(NullDevices::default());
    let (d, ids) = h.start_with(Some(&devices), false);
    let gens: Vec<Uuid> = ids.iter().map(|i| generation(&d, *i)).collect();
    write(&d, ids[0], 5);
    let Ok(Reply::Created(s)) = d.handle(Request::SnapshotCreate { storage: Storage::Ranges })
    else {
        panic!("create");
    };
    d.handle(Request::SnapshotAdd { id: s, dev: ids[1].into() }).unwrap();
    let storage = h.state.with_file_name("storage.img");
    std::fs::File::create(&storage).unwrap().set_len(4 << 20).unwrap();
    let ranges = vec![Range { offset: 0, count: 8192 }];
    let path = storage.display().to_string();
    d.handle(Request::SnapshotAppend { id: s, path, ranges }).unwrap();
    d.handle(Request::SnapshotTake { id: s }).unwrap();
    assert!(d.list().iter().any(|e| matches!(e.role, Role::Image { .. })), "an image");
    write(&d, ids[1], 9);
    d.shutdown();
    drop(d);
    let left: Vec<DeviceId> = devices.list().values().map(|(dev, _)| *dev).collect();
    assert_eq!(left, ids, "a clean stop leaves the origin devices, not the image");
    assert!(devices.list().values().all(|(_, image)| !image));
    assert!(h.files().contains(&"devices".to_string()), "the device map stays: {:?}", h.files());
    let (d, again) = h.start_with(Some(&devices), false);
    assert_eq!(again, ids, "taken over as the same devices");
    assert_eq!(again.iter().map(|i| generation(&d, *i)).collect::<Vec<_>>(), gens);
    assert!(marked(&d, ids[0], 5) && marked(&d, ids[1], 9), "tracking is continuous");
    assert!(d.engine().snapshot_collect().is_empty(), "no snapshot survives a stop");
    let (existing, served) = devices_of(&devices, &d);
    assert_eq!(existing, served);
}

#[test]
fn remove_devices_on_stop_removes_them() {
    let h = host(2);
    let devices = Arc::new(NullDevices::default());
    let (d, ids) = h.start_with(Some(&devices), true);
    write(&d, ids[0], 1);
    let gen = generation(&d, ids[0]);
    d.shutdown();
    drop(d);
    assert!(devices.list().is_empty(), "the old behaviour, on request: {:?}", devices.list());
    assert!(!h.files().contains(&"devices".to_string()), "{:?}", h.files());
    let (d, ids) = h.start_with(Some(&devices), false);
    assert_eq!(generation(&d, ids[0]), gen, "the CBT is saved either way");
    assert!(marked(&d, ids[0], 1));
}

#[test]
fn a_stale_device_map_never_deletes_a_new_device() {
    // Found by the simulation: a crash tore the device map's write of a RemoveDevice, so the
    // map still named the removed device's number; the next start served the backing again as
    // a new device, which got that (lowest free) number, and then deleted "the stale device" —
    // the new one, which the daemon went on to list as served.
    let h = host(2);
    let devices = Arc::new(NullDevices::default());
    let (d, ids) = h.start_with(Some(&devices), false);
    h.faults.arm(0, true, 0);
    d.remove_origin(ids[0]).unwrap();
    assert!(h.faults.dead(), "the map's write was torn");
    drop(d); // the crash
    let (d, _) = h.start_with(Some(&devices), false);
    let (existing, served) = devices_of(&devices, &d);
    assert_eq!(existing, served, "every served device exists, no other does");
    assert_eq!(served.len(), 2);
}
