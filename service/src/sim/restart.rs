//! Crashes, clean stops, faults on the state directory while no daemon runs, and restarts
//! with the checks of each configured device's restored map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use blksnap_engine::cbt::CbtState;
use blksnap_engine::{Clock, Engine, EngineConfig};
use blksnap_model::{DeviceId, Params};

use crate::daemon::{Daemon, NullFrontend};
use crate::state::{StateDir, Witness};

use super::checker::{check_marks, ODev, Oracle};
use super::{
    backing_path, dir_names, file_name, Res, Sim, BACKING_BYTES, BLOCK_BACKING, CONFIGURED,
};
use crate::state::DEVICES;

/// Why a restart happens, and what the oracle expects of each device's map.
pub(super) enum RestartCause {
    First,
    /// The daemon was dropped (`torn`: its state-directory writes stopped at a crash fault,
    /// perhaps between serving a device and recording it in the device map).
    Crash {
        torn: bool,
    },
    /// A clean stop; `failed` are backings whose state file could not be written (ENOSPC),
    /// `dirty` backings whose map cannot be trusted (offline write, torn file).
    Clean {
        failed: BTreeSet<usize>,
        dirty: BTreeSet<usize>,
    },
}

impl Sim {
    /// A crash (`torn`: at a state-directory write of a request): the process state is gone,
    /// its devices stay (as ublk devices stay for user recovery).
    pub(super) fn crash_and_restart(&mut self, torn: bool) -> Res {
        drop(self.daemon.take());
        // Between requests, every device is in the device map: each configured one must come
        // back as the same device.
        self.left = if torn { BTreeMap::new() } else { self.configured_ids() };
        self.o = Oracle::default();
        self.while_down(false, &mut BTreeSet::new())?;
        self.restart(&BTreeMap::new(), &RestartCause::Crash { torn })
    }

    /// The devices of configured backings: backing → device.
    fn configured_ids(&self) -> BTreeMap<usize, DeviceId> {
        let configured = self.o.devs.iter().filter(|(_, d)| d.backing < CONFIGURED);
        configured.map(|(id, d)| (d.backing, *id)).collect()
    }

    /// A clean stop (possibly hit by a fault), a gap, a restart.
    pub(super) fn stop_and_restart(&mut self, plain: bool) -> Res {
        let mut before: BTreeMap<usize, (ODev, CbtState)> = BTreeMap::new();
        for (id, od) in &self.o.devs {
            if od.track.is_some() {
                let st = self.d().engine().cbt_export(*id).map_err(|e| format!("export: {e:?}"))?;
                before.insert(od.backing, (od.clone(), st));
            }
        }
        // Faults: ENOSPC at one change of the stop, or a crash at one.
        let changes = self.o.snaps.len() as u64 + before.len() as u64 + 2;
        let fault = if plain { 0 } else { self.rng.below(10) };
        let at = self.rng.below(changes);
        let keep = self.rng.below(200) as usize;
        match fault {
            0..=1 => {
                self.faults.arm(at, false, keep);
            }
            2 => self.faults.arm(at, true, keep),
            _ => {}
        }
        self.trace(|| format!("clean stop (fault {fault}, at change {at})"));
        let d = self.daemon.take().expect("running");
        let keeps = d.config().keeps_devices();
        let origins: BTreeSet<DeviceId> = self.o.devs.keys().copied().collect();
        d.shutdown();
        drop(d);
        let hit = self.faults.hit();
        let dead = self.faults.dead();
        let mut failed = BTreeSet::new();
        if let Some(p) = &hit {
            if dead {
                self.report.crashes_in_stop += 1;
            } else {
                self.report.enospc += 1;
            }
            for b in before.keys() {
                if *p == self.cbt_file(*b) {
                    failed.insert(*b);
                }
            }
        }
        self.faults.reset();
        if dead {
            self.left = BTreeMap::new();
            self.o = Oracle::default();
            self.while_down(false, &mut BTreeSet::new())?;
            return self.restart(&BTreeMap::new(), &RestartCause::Crash { torn: true });
        }
        self.report.clean_stops += 1;
        // The devices a clean stop leaves: every origin (by default), or none
        // (`remove_devices_on_stop`); never an image (snapshots do not survive a stop).
        let left: BTreeSet<(DeviceId, bool)> = self.devices.list().into_values().collect();
        let want_left: BTreeSet<(DeviceId, bool)> =
            if keeps { origins.iter().map(|id| (*id, false)).collect() } else { BTreeSet::new() };
        if left != want_left {
            return Err(format!(
                "a clean stop (keeping devices: {keeps}) left the devices {left:?}, expected \
                 {want_left:?}"
            ));
        }
        if keeps {
            self.report.stops_keeping += 1;
            self.left = self.configured_ids();
        } else {
            self.left = BTreeMap::new();
        }
        self.o = Oracle::default();
        // What a clean stop leaves in the directory: the saved trackers (those not failed),
        // and the device map when it left devices; nothing else.
        let names = dir_names(&self.state_dir)?;
        let mut want: BTreeSet<String> = before
            .keys()
            .filter(|b| !failed.contains(b))
            .map(|b| file_name(&self.cbt_file(*b)))
            .collect();
        if keeps && !origins.is_empty() {
            want.insert(DEVICES.to_string());
        }
        let names: BTreeSet<String> =
            names.into_iter().filter(|n| !self.lingering.contains(n) || want.contains(n)).collect();
        if names != want {
            return Err(format!(
                "after a clean stop the state directory holds {names:?}, expected {want:?}"
            ));
        }
        let mut dirty = BTreeSet::new();
        if !plain {
            self.while_down(true, &mut dirty)?;
        }
        let saved: BTreeMap<usize, (ODev, CbtState)> =
            before.into_iter().filter(|(b, _)| !failed.contains(b)).collect();
        self.restart(&saved, &RestartCause::Clean { failed, dirty })
    }

    /// Changes the simulated witness of the backing presented as a block device.
    pub(super) fn change_witness(&mut self, f: impl FnOnce(&mut Witness)) {
        let canonical = self.canonical(BLOCK_BACKING);
        let mut w = self.faults.block_witness(&canonical).expect("a simulated block device");
        f(&mut w);
        self.faults.set_block_witness(&canonical, w);
    }

    /// The canonical path of backing `b` (its identity's name).
    pub(super) fn canonical(&self, b: usize) -> String {
        let canonical = std::fs::canonicalize(backing_path(&self.root, b)).unwrap_or_default();
        canonical.display().to_string()
    }

    pub(super) fn cbt_file(&self, b: usize) -> PathBuf {
        let canonical = std::fs::canonicalize(backing_path(&self.root, b)).unwrap_or_default();
        StateDir::cbt_path_in(&self.state_dir, &canonical.display().to_string())
    }

    /// While no daemon runs: maybe write a backing directly, maybe tear a saved state file.
    pub(super) fn while_down(&mut self, clean: bool, dirty: &mut BTreeSet<usize>) -> Res {
        if self.rng.chance(25) {
            let b = self.rng.below(CONFIGURED as u64) as usize;
            let off = self.rng.below(BACKING_BYTES - 4096);
            let byte = self.rng.next() as u8;
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(backing_path(&self.root, b))
                .map_err(|e| format!("offline write: {e}"))?;
            f.write_all_at(&[byte; 4096], off).map_err(|e| format!("offline write: {e}"))?;
            self.trace(|| format!("offline write of backing {b} at {off}"));
            self.report.offline_writes += 1;
            if b == BLOCK_BACKING {
                // The kernel counts the write (one I/O, 8 sectors): only the witness can tell,
                // the block device's identity has no times.
                self.change_witness(|w| {
                    w.counters[0] += 1;
                    w.counters[1] += 8;
                });
            }
            dirty.insert(b);
        }
        // The block device's witness moved by something else than a write: a reboot (new boot
        // id, counters from zero) or the loop device re-attached (new diskseq). Either forces a
        // new generation for it, and only for it.
        if clean && self.rng.chance(4) {
            let reboot = self.rng.chance(50);
            self.change_witness(|w| {
                if reboot {
                    w.boot_id.push('+');
                    w.counters = vec![0; 4];
                } else {
                    w.diskseq += 1;
                }
            });
            self.trace(|| if reboot { "reboot".into() } else { "loop device re-attached".into() });
            self.report.witness_resets += 1;
            dirty.insert(BLOCK_BACKING);
        }
        if clean && self.rng.chance(15) {
            let b = self.rng.below(CONFIGURED as u64) as usize;
            let path = self.cbt_file(b);
            if let Ok(mut bytes) = std::fs::read(&path) {
                if self.rng.chance(50) {
                    let n = self.rng.below(bytes.len() as u64) as usize;
                    bytes.truncate(n);
                } else {
                    let i = self.rng.below(bytes.len() as u64) as usize;
                    bytes[i] ^= 1 << self.rng.below(8);
                }
                std::fs::write(&path, &bytes).map_err(|e| format!("tear: {e}"))?;
                self.trace(|| format!("tore the state file of backing {b}"));
                self.report.torn_files += 1;
                dirty.insert(b);
            }
        }
        Ok(())
    }

    /// Starts a daemon on the state directory and checks each configured device's map against
    /// what was saved.
    pub(super) fn restart(
        &mut self,
        saved: &BTreeMap<usize, (ODev, CbtState)>,
        cause: &RestartCause,
    ) -> Res {
        self.faults.reset(); // a new process
                             // Sometimes the disk is full when the daemon starts: the marker cannot be written, the
                             // start is refused (and retried, as systemd would).
        if self.rng.chance(5) {
            self.faults.arm(0, false, self.rng.below(8) as usize);
            if StateDir::open_with_faults(&self.state_dir, Some(self.faults.clone())).is_ok() {
                return Err("a start whose marker could not be written was not refused".into());
            }
            self.report.enospc += 1;
            self.report.starts_refused += 1;
            self.faults.reset();
        }
        self.incarnation += 1;
        let sd = StateDir::open_with_faults(&self.state_dir, Some(self.faults.clone()))
            .map_err(|e| format!("state dir: {e}"))?;
        let params = Params::default();
        let engine = Engine::new(EngineConfig::new(
            params,
            Some(self.cfg.seed.wrapping_mul(1000).wrapping_add(self.incarnation)),
            Clock::manual(true),
        ))
        .map_err(|e| format!("engine: {e:?}"))?;
        let frontend = NullFrontend::lasting(self.fail_images.clone(), self.devices.clone());
        // Mostly the default (a clean stop keeps the devices), sometimes the old behaviour.
        let mut config = self.config.clone();
        config.remove_devices_on_stop = self.rng.chance(20);
        let d = Daemon::with_state(Arc::new(engine), Box::new(frontend), config, sd);
        let ids = d.add_configured().map_err(|e| format!("start: {e}"))?;
        self.daemon = Some(d);
        self.report.restarts += 1;
        self.trace(|| format!("restart {} devices", ids.len()));
        // The devices the previous run left: each configured one is taken over (the same
        // device), the others deleted. Only a crash at a state-directory write can leave a
        // device the map does not name (served, not yet recorded): nothing can find it again
        // (an orphan, as a ublk device would be); the simulation deletes it, as an
        // administrator would, and counts it.
        for (b, id) in ids.iter().enumerate() {
            if let Some(old) = self.left.get(&b) {
                if old != id {
                    return Err(format!(
                        "restart: configured device {b} was {old}, left for this daemon, and is \
                         now {id}: not taken over"
                    ));
                }
                self.report.devices_taken_over += 1;
            }
        }
        self.left = BTreeMap::new();
        let torn = matches!(cause, RestartCause::Crash { torn: true });
        for (handle, (dev, image)) in self.devices.list() {
            if !ids.contains(&dev) || image {
                if !torn {
                    return Err(format!(
                        "restart: device {dev} (handle {handle}, image: {image}) of the previous \
                         run neither taken over nor deleted"
                    ));
                }
                self.trace(|| format!("orphan device {dev} deleted"));
                self.report.orphans += 1;
                self.devices.remove(handle);
            }
        }
        for (b, id) in ids.into_iter().enumerate() {
            let attach = self.config.devices[b].attach;
            let st = self.d().engine().cbt_export(id).ok();
            let prev = saved.get(&b);
            let expect_restored = match cause {
                RestartCause::Clean { failed, dirty } => {
                    prev.is_some() && !failed.contains(&b) && !dirty.contains(&b)
                }
                _ => false,
            };
            let what = format!("restart: configured device {b}");
            let track = match (st, prev) {
                (None, _) if expect_restored || attach => {
                    return Err(format!("{what}: not tracked"));
                }
                (None, _) => None,
                (Some(st), Some((od, then))) if st.generation == then.generation => {
                    // The same generation: the saved state, exactly (which marks every block
                    // written since the last take), and only when nothing can have changed it.
                    let t = od.track.clone().expect("tracked");
                    if st != *then {
                        return Err(format!("{what}: same generation, another map:\n  saved {then:?}\n  now   {st:?}"));
                    }
                    check_marks(id, &t, &st)?;
                    if !expect_restored {
                        return Err(format!("{what}: the saved map came back after a gap that may have changed the backing"));
                    }
                    self.report.maps_restored += 1;
                    Some(t)
                }
                (Some(_), _) => {
                    if expect_restored {
                        return Err(format!(
                            "{what}: a new generation after a clean stop with nothing changed"
                        ));
                    }
                    self.report.new_generations += 1;
                    Some(self.fresh_track(id, &what)?)
                }
            };
            self.o.devs.insert(id, ODev { backing: b, track });
        }
        Ok(())
    }
}
