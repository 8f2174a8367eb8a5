//! The oracle (what the daemon must hold) and the checks run after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use blksnap_engine::cbt::CbtState;
use blksnap_model::{DeviceId, SnapshotId, Uuid};
use blksnap_proto::{EventW, Role};

use crate::state::{DEVICES, MARKER};

use super::{backing_path, dir_names, Res, Sim};

/// The oracle's tracker of one device.
#[derive(Clone, Debug)]
pub(super) struct Track {
    pub(super) generation: Uuid,
    pub(super) active: u8,
    pub(super) previous: u8,
    /// Blocks written since the last take (write map at `active`).
    pub(super) since: BTreeSet<u64>,
    /// Blocks written in the interval before the last take (read map at `previous`); `None`
    /// after a wrap (the read map is stale on purpose then).
    pub(super) last: Option<BTreeSet<u64>>,
}

#[derive(Clone, Debug)]
pub(super) struct ODev {
    pub(super) backing: usize,
    pub(super) track: Option<Track>,
}

#[derive(Clone, Debug)]
pub(super) struct OSnap {
    pub(super) id: SnapshotId,
    pub(super) members: Vec<DeviceId>,
    pub(super) taken: bool,
}

/// The expected state of a running daemon.
#[derive(Default)]
pub(super) struct Oracle {
    pub(super) devs: BTreeMap<DeviceId, ODev>,
    pub(super) snaps: Vec<OSnap>,
    /// Events requeued for a snapshot (front first).
    pub(super) kept: HashMap<SnapshotId, std::collections::VecDeque<EventW>>,
}

impl Oracle {
    pub(super) fn served(&self, backing: usize) -> Option<DeviceId> {
        self.devs.iter().find(|(_, d)| d.backing == backing).map(|(id, _)| *id)
    }
    pub(super) fn in_snapshot(&self, dev: DeviceId) -> bool {
        self.snaps.iter().any(|s| s.members.contains(&dev))
    }
}

impl Sim {
    /// The observable state (for the all-or-nothing comparison of failed requests).
    pub(super) fn observe(&self) -> Res<String> {
        let d = self.d();
        let mut list: Vec<String> = d.list().iter().map(|e| format!("{e:?}")).collect();
        list.sort();
        let mut snaps: Vec<String> =
            d.engine().snapshot_collect().iter().map(|s| format!("{s:?}")).collect();
        snaps.sort();
        let mut cbt = Vec::new();
        for id in self.o.devs.keys() {
            let info = d.engine().cbt_info(*id).ok();
            let membership = d.engine().snapshot_info(*id).ok().map(|i| (i.error_code, i.image));
            cbt.push(format!("{id}: {info:?} {membership:?}"));
        }
        Ok(format!("{list:?} {snaps:?} {cbt:?} {:?}", d.engine().live()))
    }

    /// Everything the oracle knows, compared with the daemon.
    pub(super) fn check(&mut self) -> Res {
        let d = self.d();
        let list = d.list();
        let mut origins = BTreeMap::new();
        let mut images = BTreeSet::new();
        for e in &list {
            match e.role {
                Role::Origin => {
                    origins.insert(DeviceId::from(e.dev), e.backing.clone());
                }
                Role::Image { of } => {
                    images.insert(DeviceId::from(of));
                }
            }
        }
        let want: BTreeMap<DeviceId, String> = self
            .o
            .devs
            .iter()
            .map(|(id, od)| (*id, backing_path(&self.root, od.backing).display().to_string()))
            .collect();
        if origins != want {
            return Err(format!("devices {origins:?}, expected {want:?}"));
        }
        let want_images: BTreeSet<DeviceId> = self
            .o
            .snaps
            .iter()
            .filter(|s| s.taken)
            .flat_map(|s| s.members.iter().copied())
            .collect();
        if images != want_images {
            return Err(format!("images of {images:?}, expected of {want_images:?}"));
        }
        // The front end holds exactly the daemon's devices: none leaked (by a failed request,
        // a rollback, a restart that neither took over nor deleted a device of the last run).
        let served: BTreeSet<(DeviceId, bool)> = list
            .iter()
            .map(|e| (DeviceId::from(e.dev), matches!(e.role, Role::Image { .. })))
            .collect();
        let existing: BTreeSet<(DeviceId, bool)> = self.devices.list().into_values().collect();
        if existing != served {
            return Err(format!("devices that exist {existing:?}, served {served:?}"));
        }
        let mut snaps = d.engine().snapshot_collect();
        snaps.sort();
        let mut want_snaps: Vec<SnapshotId> = self.o.snaps.iter().map(|s| s.id).collect();
        want_snaps.sort();
        if snaps != want_snaps {
            return Err(format!("snapshots {snaps:?}, expected {want_snaps:?}"));
        }
        let live = d.engine().live();
        let tracked = self.o.devs.values().filter(|d| d.track.is_some()).count();
        if live.snapshots != want_snaps.len() || live.trackers != tracked {
            return Err(format!(
                "live engine objects {live:?}: expected {} snapshots, {tracked} trackers",
                want_snaps.len()
            ));
        }
        for (id, od) in &self.o.devs {
            let st = d.engine().cbt_export(*id);
            match (&od.track, st) {
                (None, Err(_)) => {}
                (None, Ok(_)) => return Err(format!("{id}: tracked, expected untracked")),
                (Some(_), Err(e)) => {
                    return Err(format!("{id}: untracked ({e:?}), expected tracked"))
                }
                (Some(t), Ok(st)) => check_marks(*id, t, &st)?,
            }
        }
        // The state directory of a running daemon: its marker, its device map, and the saved
        // trackers of run-time devices no configured device consumes; nothing else.
        for name in dir_names(&self.state_dir)? {
            let ok = name == MARKER || name == DEVICES || self.lingering.contains(&name);
            if !ok {
                return Err(format!(
                    "stray file {name:?} in the state directory of a running daemon"
                ));
            }
        }
        if !self.state_dir.join(MARKER).exists() {
            return Err("a running daemon without its marker".into());
        }
        self.report.checks += 1;
        Ok(())
    }
}

/// The tracker's numbers and maps against the oracle's: every block written since the last take
/// is marked in the write map, every block of the interval before it in the read map.
pub(super) fn check_marks(id: DeviceId, t: &Track, st: &CbtState) -> Res {
    if st.generation != t.generation || st.active != t.active || st.previous != t.previous {
        return Err(format!(
            "{id}: tracker {:?} {}/{}, expected {:?} {}/{}",
            st.generation, st.active, st.previous, t.generation, t.active, t.previous
        ));
    }
    for b in &t.since {
        if st.write_map.get(*b as usize).is_none_or(|v| *v < t.active) {
            return Err(format!(
                "{id}: block {b} written since the last take is not marked (write map {:?})",
                st.write_map
            ));
        }
    }
    if let Some(last) = &t.last {
        for b in last {
            if st.read_map.get(*b as usize).is_none_or(|v| *v < t.previous) {
                return Err(format!(
                    "{id}: block {b} written before the last take is not in the read map {:?}",
                    st.read_map
                ));
            }
        }
    }
    Ok(())
}
