//! The daemon simulation (`blksnap_service::sim`, binary `blksnapd-sim`): a few seeds, each run
//! twice (deterministic), and the lifecycle bugs of issue 12 that a host can reproduce as
//! regression cases — a backing written while no daemon ran, a crash, a full disk or a torn
//! file in the state directory: each must end in a new generation, never in a map that misses
//! writes, and leave no stray file.

use std::path::PathBuf;
use std::sync::Arc;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_model::{DeviceId, Uuid};
use blksnap_service::config::DeviceConfig;
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
        self.faults.reset();
        let cfg = Config {
            state_dir: self.state.clone(),
            freeze: false,
            devices: self
                .backings
                .iter()
                .map(|b| DeviceConfig { backing: b.clone(), attach: true })
                .collect(),
            ..Config::default()
        };
        let sd = StateDir::open_with_faults(&self.state, Some(self.faults.clone())).unwrap();
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        let d = Daemon::with_state(engine, Box::new(NullFrontend::default()), cfg, sd);
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
