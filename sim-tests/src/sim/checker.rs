//! The checker: the harness plus the simulation's oracle and invariants, and the trace (see
//! the module docs of `sim`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blksnap_engine::io::Fault;
use blksnap_engine::LiveCounts;
use blksnap_model::formulas::chunk_layout;
use blksnap_model::{
    CbtInfo, DeviceId, Errno, EventKind, IoKind, Params, SnapshotId, StorageStats,
    SECTOR_SIZE_BYTES,
};

use crate::{data_of, fnv1a, zeroes_of, DiskSetup, Harness, IoRecord, Op, StorageKind};

use super::*;

// ---- the checker --------------------------------------------------------------------------------

/// The image oracle of one device: its content at take plus image writes. A failed image write
/// may have landed on some sectors: those accept either version until a read settles them.
#[derive(Clone, Debug)]
struct Frozen {
    data: Vec<u8>,
    alternatives: BTreeMap<u64, Vec<Vec<u8>>>,
}

/// The last CBT state seen on a device.
#[derive(Clone, Debug)]
struct CbtSeen {
    info: CbtInfo,
    map: Vec<u8>,
}

const SECTOR: usize = SECTOR_SIZE_BYTES as usize;

fn sector_slice(data: &[u8], sector: u64) -> &[u8] {
    &data[sector as usize * SECTOR..(sector as usize + 1) * SECTOR]
}

/// A fault to inject, in the sweep: before operation `rec.step`.
#[derive(Clone, Copy, Debug)]
pub struct Injection {
    /// The I/O, as numbered by the counting run.
    pub rec: IoRecord,
    /// Earlier I/Os of the same target and kind in the same operation.
    pub ordinal: u64,
    /// What happens to it.
    pub fault: Fault,
}

/// The harness plus the simulation's oracle and invariants, and the trace.
pub struct Checker {
    /// Engine and model side by side.
    pub h: Harness,
    disk_sectors: Vec<u64>,
    disk_io_min: Vec<u64>,
    /// Chunks of each disk's diff area (layout at its take).
    area_chunks: BTreeMap<usize, u64>,
    /// Alive snapshots → member disks (add order), from the operations' results.
    members: BTreeMap<SnapshotId, Vec<usize>>,
    /// Index in `h.snapshots` of each id.
    snap_index: BTreeMap<SnapshotId, usize>,
    taken: BTreeSet<SnapshotId>,
    /// Snapshots on v3 ranges storage.
    ranges: BTreeSet<SnapshotId>,
    frozen: BTreeMap<usize, Frozen>,
    cbt_seen: Vec<Option<CbtSeen>>,
    /// CBT blocks marked since the last take, per disk.
    written: Vec<BTreeSet<u64>>,
    storage_seen: BTreeMap<SnapshotId, StorageStats>,
    last_event_time: BTreeMap<SnapshotId, u64>,
    corrupted_popped: BTreeSet<(SnapshotId, DeviceId)>,
    /// Error code of each (snapshot, member) once its diff area failed.
    corrupt_seen: BTreeMap<(SnapshotId, DeviceId), i32>,
    last_now: u64,
    /// Statistics.
    pub stats: Stats,
    /// The injection the next matching step gets (sweep).
    pub injection: Option<Injection>,
    trace_out: Option<Box<dyn Write + Send>>,
    tail: VecDeque<String>,
    trace_hash: u64,
    /// Steps done, readable from a watchdog thread.
    pub heartbeat: Arc<AtomicU64>,
}

impl Checker {
    /// A checker over `disks` with `Params::small()` and ids from `seed`; trace lines go to
    /// `trace_out` if given.
    pub fn new(disks: &[DiskSetup], seed: u64, trace_out: Option<Box<dyn Write + Send>>) -> Self {
        let params = Params::small();
        let n = disks.len();
        Checker {
            h: Harness::new(params, disks, seed),
            disk_sectors: disks.iter().map(|d| d.sectors).collect(),
            disk_io_min: disks.iter().map(|d| d.io_min_sectors).collect(),
            area_chunks: BTreeMap::new(),
            members: BTreeMap::new(),
            snap_index: BTreeMap::new(),
            taken: BTreeSet::new(),
            ranges: BTreeSet::new(),
            frozen: BTreeMap::new(),
            cbt_seen: vec![None; n],
            written: vec![BTreeSet::new(); n],
            storage_seen: BTreeMap::new(),
            last_event_time: BTreeMap::new(),
            corrupted_popped: BTreeSet::new(),
            corrupt_seen: BTreeMap::new(),
            last_now: 0,
            stats: Stats::default(),
            injection: None,
            trace_out,
            tail: VecDeque::new(),
            trace_hash: fnv1a(&[]),
            heartbeat: Arc::new(AtomicU64::new(0)),
        }
    }

    /// FNV hash of every trace line so far.
    pub fn trace_hash(&self) -> u64 {
        self.trace_hash
    }

    /// The last [`TRACE_TAIL`] trace lines.
    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().cloned().collect()
    }

    /// Alive snapshot ids, in creation order.
    pub fn alive(&self) -> Vec<SnapshotId> {
        self.h.model.snapshot_collect()
    }

    /// A snapshot created outside [`Checker::step`] (a concurrent round) and appended to
    /// `h.snapshots`: known to the generator from now on. The oracle's bookkeeping is not
    /// updated (rounds are checked against the model instead).
    pub fn adopt_created(&mut self, id: SnapshotId) {
        let index = self.h.snapshots.iter().rposition(|s| *s == id);
        let index = index.expect("adopted ids are in the harness's list");
        self.snap_index.insert(id, index);
        self.members.entry(id).or_default();
    }

    /// Index (for [`Op`]s) of an alive id.
    pub fn index_of(&self, id: SnapshotId) -> usize {
        self.snap_index[&id]
    }

    /// Whether snapshot `id` has v3 ranges storage.
    pub fn is_ranges(&self, id: SnapshotId) -> bool {
        self.ranges.contains(&id)
    }

    /// Whether snapshot `id` is taken and has a member whose diff area still works.
    pub fn is_healthy(&self, id: SnapshotId) -> bool {
        self.taken.contains(&id)
            && self
                .members_of(id)
                .iter()
                .any(|&d| !self.corrupt_seen.contains_key(&(id, self.h.disk_id(d))))
    }

    /// Whether snapshot `id` is taken.
    pub fn is_taken(&self, id: SnapshotId) -> bool {
        self.taken.contains(&id)
    }

    /// Member disks of an alive snapshot.
    pub fn members_of(&self, id: SnapshotId) -> &[usize] {
        self.members.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Whether disk `d` has a tracker (as of the last step).
    pub fn is_attached(&self, d: usize) -> bool {
        self.cbt_seen[d].is_some()
    }

    /// The snapshot disk `d` is a member of.
    pub fn snapshot_of(&self, d: usize) -> Option<SnapshotId> {
        self.members.iter().find(|(_, m)| m.contains(&d)).map(|(id, _)| *id)
    }

    /// Sectors of disk `d`.
    pub fn disk_sectors(&self, d: usize) -> u64 {
        self.disk_sectors[d]
    }

    /// Disk count.
    pub fn disks(&self) -> usize {
        self.disk_sectors.len()
    }

    pub(super) fn trace(&mut self, line: String) {
        self.trace_hash = fnv1a(line.as_bytes()) ^ self.trace_hash.rotate_left(5);
        if let Some(out) = self.trace_out.as_mut() {
            // A broken trace sink is not a reason to stop the simulation.
            let _ = writeln!(out, "{line}");
        }
        if self.tail.len() == TRACE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// Flush the trace sink.
    pub fn flush_trace(&mut self) {
        if let Some(out) = self.trace_out.as_mut() {
            let _ = out.flush();
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
        self.stats.invariant_checks += 1;
        if ok {
            Ok(())
        } else {
            Err(format!("invariant violated: {}", what()))
        }
    }

    /// Apply `op` on both sides, compare, and check every invariant. One trace line.
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        let step = self.h.ops_applied + 1;
        if let Some(inj) = self.injection.filter(|inj| inj.rec.step == step) {
            self.h.fail_io(&inj.rec, inj.ordinal, inj.fault);
            self.trace(format!(
                "{step:>6} inject {:?} on {:?} {:?} #{} (plan op {})",
                inj.fault, inj.rec.target, inj.rec.op, inj.ordinal, inj.rec.plan_index
            ));
        }
        let pre = self.pre_image(op);
        let applied = self.h.apply(op);
        self.trace(format!("{step:>6} {op:?} -> {}", self.h.last.summary));
        self.heartbeat.store(step, Ordering::Relaxed);
        applied?;
        self.h.check_state().map_err(|m| format!("after the step: {m}"))?;
        let failed = self.h.last.errno.is_some();
        let counts = self.stats.ops.entry(op_name(op)).or_default();
        if failed {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
        self.after_op(op, pre)?;
        self.after_step()
    }

    /// The origin bytes a write may change, read before it (below the fault layer).
    fn pre_image(&self, op: &Op) -> Option<Vec<u8>> {
        match *op {
            Op::Write { disk, sector, sectors, .. }
            | Op::Discard { disk, sector, sectors }
            | Op::WriteZeroes { disk, sector, sectors } => {
                let d = disk % self.disks();
                (sectors > 0 && sector.checked_add(sectors)? <= self.disk_sectors[d]).then(|| {
                    self.h.peek_origin(d, sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES)
                })
            }
            _ => None,
        }
    }

    fn mark_written(&mut self, d: usize, sector: u64, sectors: u64) {
        let Some(seen) = &self.cbt_seen[d] else { return };
        if sectors == 0 {
            return;
        }
        let block_sectors = u64::from(seen.info.block_size_bytes) / SECTOR_SIZE_BYTES;
        let (first, last) = (sector / block_sectors, (sector + sectors - 1) / block_sectors);
        self.written[d].extend(first..=last);
    }

    fn after_op(&mut self, op: &Op, pre: Option<Vec<u8>>) -> Result<(), String> {
        let n = self.disks();
        let last = self.h.last.clone();
        let ok = last.errno.is_none();
        match *op {
            Op::Write { disk, sector, sectors, .. }
            | Op::Discard { disk, sector, sectors }
            | Op::WriteZeroes { disk, sector, sectors } => {
                let d = disk % n;
                let Some(old) = pre else { return Ok(()) };
                let new = match *op {
                    Op::Write { seed, .. } => data_of(sectors, seed),
                    _ => vec![0u8; old.len()],
                };
                let now = self.h.peek_origin(d, sector * SECTOR_SIZE_BYTES, old.len() as u64);
                if ok {
                    self.check(now == new, || {
                        format!("{op:?} returned Ok but the device does not hold its data")
                    })?;
                    self.stats.origin_bytes_written += new.len() as u64;
                    self.mark_written(d, sector, sectors);
                } else {
                    // Some prefix of the new data, then the old data: never anything else.
                    let landed = (0..sectors)
                        .take_while(|&s| sector_slice(&now, s) == sector_slice(&new, s))
                        .count() as u64;
                    let rest_old =
                        (landed..sectors).all(|s| sector_slice(&now, s) == sector_slice(&old, s));
                    self.check(rest_old, || {
                        format!("{op:?} failed but left data that is neither a prefix nor old")
                    })?;
                    if (0..sectors).any(|s| sector_slice(&now, s) != sector_slice(&old, s)) {
                        self.stats.torn_origin_writes += 1;
                    }
                }
            }
            Op::Read { disk, sector, sectors } => {
                if let Some(bytes) = &last.bytes {
                    let d = disk % n;
                    let dev = self.h.peek_origin(d, sector * SECTOR_SIZE_BYTES, bytes.len() as u64);
                    self.check(*bytes == dev, || {
                        format!("{op:?} returned bytes the device lacks")
                    })?;
                    self.stats.origin_bytes_read += sectors * SECTOR_SIZE_BYTES;
                }
            }
            Op::ImageRead { disk, sector, sectors } => {
                if let Some(bytes) = &last.bytes {
                    let d = disk % n;
                    self.check_image_read(d, sector, sectors, bytes)?;
                    self.stats.image_bytes_read += sectors * SECTOR_SIZE_BYTES;
                }
            }
            Op::ImageWrite { disk, sector, sectors, .. }
            | Op::ImageWriteZeroes { disk, sector, sectors } => {
                let d = disk % n;
                let data = match *op {
                    Op::ImageWrite { seed, .. } => data_of(sectors, seed),
                    _ => zeroes_of(sectors),
                };
                if ok && sectors > 0 {
                    let frozen = self.frozen.get_mut(&d);
                    let present = frozen.is_some();
                    self.check(present, || format!("{op:?} succeeded on a device without image"))?;
                    let frozen = self.frozen.get_mut(&d).expect("checked");
                    let at = sector as usize * SECTOR;
                    frozen.data[at..at + data.len()].copy_from_slice(&data);
                    for s in sector..sector + sectors {
                        frozen.alternatives.remove(&s);
                    }
                    self.stats.image_bytes_written += data.len() as u64;
                    self.mark_written(d, sector, sectors);
                } else if last.errno == Some(Errno::EIO) {
                    if let Some(frozen) = self.frozen.get_mut(&d) {
                        // Segments before the failure stay written: either version may be there.
                        for s in sector..sector + sectors {
                            let alt = sector_slice(&data, s - sector).to_vec();
                            frozen.alternatives.entry(s).or_default().push(alt);
                        }
                    }
                    // The CBT may be marked or not (a corrupted image fails before marking): the
                    // must-be-marked set takes only what surely was.
                }
            }
            Op::CbtDirty { disk, ref ranges } if ok => {
                let d = disk % n;
                for r in ranges.clone() {
                    self.mark_written(d, r.offset, r.count);
                }
            }
            Op::WaitEvent { snap, .. } => {
                if let Some(event) = last.event {
                    let id = self.h.snapshot_id(snap);
                    self.check_event(id, event)?;
                }
            }
            Op::Create { storage } if ok => {
                let id = *self.h.snapshots.last().expect("a created id");
                if storage == StorageKind::Ranges {
                    self.ranges.insert(id);
                }
                self.snap_index.insert(id, self.h.snapshots.len() - 1);
                self.members.insert(id, Vec::new());
                self.stats.snapshots_created += 1;
            }
            Op::Add { snap, disk } if ok => {
                let id = self.h.snapshot_id(snap);
                self.members.get_mut(&id).expect("an alive snapshot").push(disk % n);
            }
            Op::Take { snap } if ok => {
                let id = self.h.snapshot_id(snap);
                self.taken.insert(id);
                self.stats.snapshots_taken += 1;
                let params = self.h.model.params();
                for d in self.members[&id].clone() {
                    let layout = chunk_layout(&params, self.disk_sectors[d], self.disk_io_min[d]);
                    self.area_chunks.insert(d, layout.chunk_count);
                    let bytes = self.disk_sectors[d] * SECTOR_SIZE_BYTES;
                    let data = self.h.peek_origin(d, 0, bytes);
                    self.frozen.insert(d, Frozen { data, alternatives: BTreeMap::new() });
                }
            }
            Op::Destroy { snap } if ok => {
                let id = self.h.snapshot_id(snap);
                for d in self.members.remove(&id).unwrap_or_default() {
                    self.frozen.remove(&d);
                }
                self.taken.remove(&id);
                self.ranges.remove(&id);
                self.storage_seen.remove(&id);
                self.stats.snapshots_destroyed += 1;
            }
            Op::Fault { target, kind, errno } => {
                let t = if target.is_some() { "origin" } else { "storage" };
                let k = if kind == IoKind::Read { "read" } else { "write" };
                *self.stats.faults_armed.entry(format!("{errno:?} {t} {k}")).or_default() += 1;
            }
            Op::TornFault { target, .. } => {
                let t = if target.is_some() { "origin" } else { "storage" };
                *self.stats.faults_armed.entry(format!("torn {t} write")).or_default() += 1;
            }
            Op::FailGrowth { errno } => {
                *self.stats.faults_armed.entry(format!("{errno:?} growth")).or_default() += 1;
            }
            _ => {}
        }
        Ok(())
    }

    fn check_image_read(
        &mut self,
        d: usize,
        sector: u64,
        sectors: u64,
        bytes: &[u8],
    ) -> Result<(), String> {
        if sectors == 0 {
            return Ok(());
        }
        let present = self.frozen.contains_key(&d);
        self.check(present, || format!("an image read of disk {d} succeeded without an image"))?;
        let frozen = self.frozen.get_mut(&d).expect("checked");
        let mut bad = None;
        for s in sector..sector + sectors {
            let got = sector_slice(bytes, s - sector);
            if got == sector_slice(&frozen.data, s) {
                frozen.alternatives.remove(&s);
                continue;
            }
            let alt_ok =
                frozen.alternatives.get(&s).is_some_and(|alts| alts.iter().any(|a| a == got));
            if alt_ok {
                let at = s as usize * SECTOR;
                frozen.data[at..at + SECTOR].copy_from_slice(got);
                frozen.alternatives.remove(&s);
            } else {
                bad = Some(s);
                break;
            }
        }
        self.check(bad.is_none(), || {
            format!("image of disk {d}: sector {} differs from the frozen copy", bad.unwrap_or(0))
        })
    }

    fn check_event(&mut self, id: SnapshotId, event: blksnap_model::Event) -> Result<(), String> {
        *self.stats.events.entry(event_name(&event.kind)).or_default() += 1;
        let now = self.h.engine.now_ns();
        let last = self.last_event_time.get(&id).copied().unwrap_or(0);
        self.check(event.time_ns <= now && event.time_ns >= last, || {
            format!("event {event:?} out of order (last {last}, now {now})")
        })?;
        self.last_event_time.insert(id, event.time_ns);
        if let EventKind::Corrupted { device, errno } = event.kind {
            let first = self.corrupted_popped.insert((id, device));
            self.check(first, || format!("a second Corrupted event for {device} in {id}"))?;
            let code = self.corrupt_seen.get(&(id, device)).copied();
            self.check(code == Some(-errno.code()), || {
                format!("Corrupted{{{device}, {errno:?}}} but the device's error is {code:?}")
            })?;
        }
        Ok(())
    }

    /// Invariants of the whole state, after every step.
    fn after_step(&mut self) -> Result<(), String> {
        let alive = self.alive();
        self.stats.max_alive = self.stats.max_alive.max(alive.len());
        let tracked: Vec<SnapshotId> = self.members.keys().copied().collect();
        let mut sorted = alive.clone();
        sorted.sort();
        self.check(sorted == tracked, || format!("alive {alive:?} but tracked {tracked:?}"))?;
        // Storage accounting.
        for &id in &alive {
            let st =
                self.h.engine.storage_stats(id).map_err(|e| format!("stats of {id}: {e:?}"))?;
            let prev = self.storage_seen.get(&id).copied();
            self.check(st.filled_sectors <= st.capacity_sectors.max(st.requested_sectors), || {
                format!("storage of {id}: filled beyond capacity and request: {st:?}")
            })?;
            if let Some(p) = prev {
                self.check(!p.overflow || st.overflow, || format!("overflow of {id} cleared"))?;
                self.check(
                    st.filled_sectors >= p.filled_sectors
                        && st.capacity_sectors >= p.capacity_sectors,
                    || format!("storage of {id} shrank: {p:?} -> {st:?}"),
                )?;
            }
            if st.overflow && !prev.is_some_and(|p| p.overflow) {
                self.stats.overflows += 1;
            }
            self.storage_seen.insert(id, st);
        }
        // Diff-area errors: first error wins, never cleared.
        for (&id, devs) in &self.members.clone() {
            for &d in devs {
                let dev = self.h.disk_id(d);
                let info = self.h.engine.snapshot_info(dev).map_err(|e| format!("info: {e:?}"))?;
                let seen = self.corrupt_seen.get(&(id, dev)).copied();
                if let Some(code) = seen {
                    self.check(info.error_code == code, || {
                        format!("{dev}: error code changed {code} -> {}", info.error_code)
                    })?;
                } else if info.error_code != 0 {
                    self.corrupt_seen.insert((id, dev), info.error_code);
                    self.stats.corruptions += 1;
                }
            }
        }
        self.check_cbt()?;
        self.check_live()?;
        if alive.iter().any(|id| self.is_healthy(*id)) {
            self.stats.steps_with_live_image += 1;
        }
        let now = self.h.engine.now_ns();
        let last_now = self.last_now;
        self.check(now >= last_now, || format!("clock went back {last_now} -> {now}"))?;
        self.last_now = now;
        Ok(())
    }

    fn check_cbt(&mut self) -> Result<(), String> {
        for d in 0..self.disks() {
            let dev = self.h.disk_id(d);
            let now = match self.h.engine.cbt_info(dev) {
                Ok(info) => {
                    let mut map = Vec::new();
                    self.h
                        .engine
                        .cbt_map(dev, 0, info.block_count, &mut map)
                        .map_err(|e| format!("cbt_map: {e:?}"))?;
                    Some(CbtSeen { info, map })
                }
                Err(_) => None,
            };
            let prev = self.cbt_seen[d].take();
            match (&prev, &now) {
                (None, Some(s)) => {
                    // A fresh attach.
                    self.written[d].clear();
                    self.check(
                        s.info.changes_number == 0 && s.map.iter().all(|b| *b == 0),
                        || format!("{dev}: a new tracker is not clean: {:?}", s.info),
                    )?;
                }
                (Some(_), None) => self.written[d].clear(),
                (Some(p), Some(s)) => {
                    let (pc, sc) = (p.info.changes_number, s.info.changes_number);
                    let same_gen = p.info.generation_id == s.info.generation_id;
                    if same_gen && pc == sc {
                        let mono = p.map.iter().zip(&s.map).all(|(a, b)| b >= a);
                        self.check(mono, || {
                            format!("{dev}: a CBT value decreased without a take")
                        })?;
                    } else {
                        // A take: exactly one switch.
                        let expect = if pc == 255 { 1 } else { pc + 1 };
                        let wrapped = expect == 255;
                        self.check(sc == expect && same_gen != wrapped, || {
                            format!("{dev}: CBT switch {pc} -> {sc}, same generation {same_gen}")
                        })?;
                        self.stats.cbt_switches.0 += 1;
                        if wrapped {
                            self.stats.cbt_switches.1 += 1;
                        } else {
                            let missed = self.written[d]
                                .iter()
                                .copied()
                                .find(|&b| s.map.get(b as usize).copied() != Some(sc));
                            self.check(missed.is_none(), || {
                                format!("{dev}: block {missed:?} written since the last take but not {sc} in the CBT")
                            })?;
                        }
                        self.written[d].clear();
                    }
                }
                (None, None) => {}
            }
            self.cbt_seen[d] = now;
        }
        Ok(())
    }

    fn check_live(&mut self) -> Result<(), String> {
        let live = self.h.engine.live();
        let alive = self.members.len();
        let attached = self.cbt_seen.iter().filter(|s| s.is_some()).count();
        let taken_members: Vec<usize> = self
            .members
            .iter()
            .filter(|(id, _)| self.taken.contains(id))
            .flat_map(|(_, m)| m.iter().copied())
            .collect();
        let chunk_bound: u64 = taken_members.iter().map(|d| self.area_chunks[d]).sum();
        let expected = LiveCounts {
            snapshots: alive,
            trackers: attached,
            diff_areas: taken_members.len(),
            diff_storages: alive,
            chunks: live.chunks,
        };
        self.check(live == expected && live.chunks as u64 <= chunk_bound, || {
            format!("live objects {live:?}, expected {expected:?} with chunks <= {chunk_bound}")
        })
    }

    /// End of a run: drain every event queue (none may be lost), read every image whole, then
    /// destroy and detach everything: nothing may stay alive.
    pub fn finish(&mut self) -> Result<(), String> {
        for id in self.alive() {
            let snap = self.index_of(id);
            for _ in 0..=blksnap_model::limits::EVENT_QUEUE_CAPACITY {
                self.step(&Op::WaitEvent { snap, timeout_ms: 0 })?;
                if self.h.last.event.is_none() {
                    break;
                }
            }
            for &(sid, dev) in self.corrupt_seen.clone().keys() {
                if sid == id {
                    let popped = self.corrupted_popped.contains(&(sid, dev));
                    self.check(popped, || {
                        format!("the Corrupted event of {dev} in {id} was lost")
                    })?;
                }
            }
        }
        for d in self.frozen.keys().copied().collect::<Vec<_>>() {
            let sectors = self.disk_sectors[d];
            self.step(&Op::ImageRead { disk: d, sector: 0, sectors })?;
        }
        self.h.teardown()?;
        self.stats.invariant_checks += 1;
        self.trace(format!("{:>6} teardown -> Ok, nothing alive", self.h.ops_applied + 1));
        Ok(())
    }
}
