//! The workload: clients' requests and origin writes drawn from the seed, each sent to the
//! daemon and its outcome checked and applied to the oracle.

use std::sync::atomic::Ordering;

use blksnap_model::{DeviceId, SnapshotId, Uuid};
use blksnap_proto::{Range, Reply, Request, Storage};

use super::checker::{ODev, OSnap};
use super::{
    backing_path, blocks, Res, Sim, BACKINGS, BACKING_BYTES, CLIENTS, EALREADY, EBUSY,
    STORAGE_BYTES, STORAGE_FILES,
};

/// splitmix64.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub(super) fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.below(v.len() as u64) as usize])
        }
    }
}

impl Sim {
    pub(super) fn write(&mut self) -> Res {
        let devs: Vec<DeviceId> = self.o.devs.keys().copied().collect();
        let Some(id) = self.rng.pick(&devs) else { return Ok(()) };
        let sectors = BACKING_BYTES >> 9;
        let off = self.rng.below(sectors) << 9;
        let len = ((1 + self.rng.below(512)) << 9).min(BACKING_BYTES - off);
        let fill = self.rng.next() as u8;
        let data = vec![fill; len as usize];
        self.trace(|| format!("write {id} {off}+{len}"));
        self.report.writes += 1;
        let result = self.d().engine().write(id, off, &data);
        if let Err(e) = result {
            return Err(format!("origin write {id} {off}+{len}: {e:?}"));
        }
        if let Some(t) = self.o.devs.get_mut(&id).and_then(|d| d.track.as_mut()) {
            t.since.extend(blocks(off, len));
        }
        Ok(())
    }

    pub(super) fn snap(&mut self, taken: Option<bool>) -> Option<SnapshotId> {
        let ids: Vec<SnapshotId> = self
            .o
            .snaps
            .iter()
            .filter(|s| taken.is_none_or(|t| s.taken == t))
            .map(|s| s.id)
            .collect();
        if self.rng.chance(5) {
            return Some(Uuid([0xee; 16])); // unknown
        }
        self.rng.pick(&ids)
    }

    pub(super) fn dev(&mut self) -> DeviceId {
        let devs: Vec<DeviceId> = self.o.devs.keys().copied().collect();
        match self.rng.pick(&devs) {
            Some(d) if !self.rng.chance(5) => d,
            _ => DeviceId::new(240, 999),
        }
    }

    pub(super) fn request(&mut self) -> Res {
        let client = self.rng.below(CLIENTS as u64);
        let kind = self.rng.below(100);
        let req = match kind {
            0..=6 => {
                let b = self.rng.below(BACKINGS as u64) as usize;
                let attach = self.rng.chance(70);
                Request::AddDevice {
                    backing: backing_path(&self.root, b).display().to_string(),
                    attach,
                }
            }
            7..=11 => Request::RemoveDevice { dev: self.dev().into() },
            12..=15 => Request::Attach { dev: self.dev().into() },
            16..=18 => Request::Detach { dev: self.dev().into() },
            19..=28 => {
                let storage = if self.rng.chance(50) {
                    Storage::Ranges
                } else {
                    Storage::File {
                        path: self.root.join("storage").display().to_string(),
                        limit_sectors: (1 + self.rng.below(8)) * 1024,
                    }
                };
                Request::SnapshotCreate { storage }
            }
            29..=36 => {
                let Some(id) = self.snap(None) else { return Ok(()) };
                let file = self.rng.below(STORAGE_FILES as u64);
                let offset = self.rng.below(STORAGE_BYTES >> 9 >> 11) << 11;
                Request::SnapshotAppend {
                    id: id.into(),
                    path: self.root.join(format!("s{file}.img")).display().to_string(),
                    ranges: vec![Range { offset, count: 2048 }],
                }
            }
            37..=48 => {
                let Some(id) = self.snap(Some(false)) else { return Ok(()) };
                Request::SnapshotAdd { id: id.into(), dev: self.dev().into() }
            }
            49..=60 => {
                let Some(id) = self.snap(Some(false)) else { return Ok(()) };
                Request::SnapshotTake { id: id.into() }
            }
            61..=70 => {
                let Some(id) = self.snap(None) else { return Ok(()) };
                Request::SnapshotDestroy { id: id.into() }
            }
            71..=82 => {
                let Some(id) = self.snap(None) else { return Ok(()) };
                let timeout_ms = if self.rng.chance(50) { 0 } else { 500 };
                Request::WaitEvent { id: id.into(), timeout_ms }
            }
            83..=86 => {
                let dev = self.dev();
                let offset = self.rng.below(BACKING_BYTES >> 9);
                let count = (1 + self.rng.below(256)).min((BACKING_BYTES >> 9) - offset);
                Request::CbtDirty { dev: dev.into(), ranges: vec![Range { offset, count }] }
            }
            87..=90 => Request::CbtInfo { dev: self.dev().into() },
            91..=93 => Request::CbtMap { dev: self.dev().into(), offset: 0, length: 64 },
            94..=96 => Request::SnapshotInfo { dev: self.dev().into() },
            _ => Request::ListDevices,
        };
        self.send(client as usize, req)
    }

    pub(super) fn send(&mut self, client: usize, req: Request) -> Res {
        // A take whose image devices fail to start (ENOMEM from the null front end).
        let failing = matches!(req, Request::SnapshotTake { .. }) && self.rng.chance(10);
        self.fail_images.store(failing, Ordering::SeqCst);
        // A client that hangs up (30%; always for a wait with a timeout: the daemon's deadline
        // is real time, so only a client that is gone returns at once from such a wait, after
        // its first slice).
        let hang_up =
            self.rng.chance(30) || matches!(req, Request::WaitEvent { timeout_ms: 1.., .. });
        let before = self.observe()?;
        let shown = format!("{req:?}");
        // A client that hangs up: a wait notices it (and stops) between its slices.
        let result = self.d().handle_for(req.clone(), &|| hang_up);
        self.fail_images.store(false, Ordering::SeqCst);
        self.report.requests += 1;
        let shown_result = format!("{result:?}");
        self.trace(|| {
            let how = if failing {
                " (images fail)"
            } else if hang_up {
                " (hangs up)"
            } else {
                ""
            };
            format!("client {client}: {shown}{how} -> {shown_result}")
        });
        let ok = result.is_ok();
        if ok {
            self.report.requests_ok += 1;
        }
        let errno = result.as_ref().err().map(|e| e.errno);
        // A take rolled back when its image could not be served: the engine switched (it
        // cannot un-take), then the snapshot was destroyed.
        let mut rolled_back = false;
        match (req, result) {
            (Request::AddDevice { backing, attach }, r) => {
                let b = (0..BACKINGS)
                    .find(|i| backing_path(&self.root, *i).display().to_string() == backing)
                    .expect("a sim backing");
                let served = self.o.served(b).is_some();
                match r {
                    Ok(Reply::Device(entry)) => {
                        if served {
                            return Err(format!(
                                "{shown}: a second add of a served backing succeeded"
                            ));
                        }
                        let id: DeviceId = entry.dev.into();
                        self.o.devs.insert(id, ODev { backing: b, track: None });
                        if attach {
                            let t = self.fresh_track(id, &shown)?;
                            self.o.devs.get_mut(&id).expect("inserted").track = Some(t);
                        }
                    }
                    Ok(other) => return Err(format!("{shown}: reply {other:?}")),
                    Err(e) if served && e.errno != EALREADY => {
                        return Err(format!(
                            "{shown}: a duplicate add failed with {e:?}, not EALREADY"
                        ))
                    }
                    Err(e) if !served => return Err(format!("{shown}: failed: {e:?}")),
                    Err(_) => {}
                }
            }
            (Request::RemoveDevice { dev }, r) => {
                let id: DeviceId = dev.into();
                let busy = self.o.in_snapshot(id);
                match r {
                    Ok(_) if busy => {
                        return Err(format!("{shown}: removed a device in a snapshot"))
                    }
                    Ok(_) => {
                        self.o.devs.remove(&id);
                    }
                    Err(e) if busy && e.errno != EBUSY => {
                        return Err(format!(
                            "{shown}: {e:?}, not EBUSY, for a device in a snapshot"
                        ))
                    }
                    Err(_) => {}
                }
            }
            (Request::Attach { dev }, Ok(_)) => {
                let id: DeviceId = dev.into();
                let t = self.fresh_track(id, &shown)?;
                if let Some(d) = self.o.devs.get_mut(&id) {
                    d.track = Some(t);
                }
            }
            (Request::Detach { dev }, Ok(_)) => {
                if let Some(d) = self.o.devs.get_mut(&dev.into()) {
                    d.track = None;
                }
            }
            (Request::CbtDirty { dev, ranges }, Ok(_)) => {
                if let Some(t) = self.o.devs.get_mut(&dev.into()).and_then(|d| d.track.as_mut()) {
                    for r in ranges {
                        let bs: Vec<u64> = blocks(r.offset << 9, r.count << 9).collect();
                        t.since.extend(bs.iter().copied());
                        if let Some(l) = t.last.as_mut() {
                            l.extend(bs);
                        }
                    }
                }
            }
            (Request::SnapshotCreate { .. }, Ok(Reply::Created(id))) => {
                self.o.snaps.push(OSnap { id: id.into(), members: Vec::new(), taken: false });
            }
            (Request::SnapshotAdd { id, dev }, Ok(_)) => {
                let id: SnapshotId = id.into();
                if let Some(s) = self.o.snaps.iter_mut().find(|s| s.id == id) {
                    s.members.push(dev.into());
                }
            }
            (Request::SnapshotTake { id }, r) => {
                let id: SnapshotId = id.into();
                let known = self.o.snaps.iter().find(|s| s.id == id).cloned();
                let switched = match (&r, &known) {
                    (Ok(_), Some(_)) => true,
                    (Err(e), Some(s)) if failing && !s.members.is_empty() && e.errno == 12 => {
                        // Checked against the oracle after the step, not against `before`.
                        rolled_back = true;
                        self.report.takes_rolled_back += 1;
                        self.o.snaps.retain(|s| s.id != id);
                        self.o.kept.remove(&id);
                        true
                    }
                    (Ok(_), None) => return Err(format!("{shown}: an unknown snapshot taken")),
                    _ => false,
                };
                if switched {
                    let s = known.expect("known");
                    if let Some(os) = self.o.snaps.iter_mut().find(|x| x.id == id) {
                        os.taken = true;
                    }
                    for m in &s.members {
                        self.switch(*m, &shown)?;
                    }
                }
            }
            (Request::SnapshotDestroy { id }, Ok(_)) => {
                let id: SnapshotId = id.into();
                self.o.snaps.retain(|s| s.id != id);
                self.o.kept.remove(&id);
            }
            (Request::WaitEvent { id, .. }, r) => {
                let id: SnapshotId = id.into();
                let expected = self.o.kept.get_mut(&id).and_then(|q| q.pop_front());
                match (r, expected) {
                    (Ok(Reply::Event(ev)), Some(want)) if ev != want => {
                        return Err(format!("{shown}: got {ev:?}, the requeued event was {want:?}"))
                    }
                    (Err(e), Some(want)) => {
                        return Err(format!("{shown}: {e:?}, the requeued event {want:?} lost"))
                    }
                    (Ok(Reply::Event(ev)), _) if hang_up => {
                        // The client hung up before reading the reply (the control server's
                        // path when the reply cannot be written).
                        self.d().requeue_event(id, ev);
                        self.o.kept.entry(id).or_default().push_front(ev);
                        self.report.events_requeued += 1;
                    }
                    _ => {}
                }
            }
            (Request::CbtInfo { dev }, r) => {
                let tracked = self.o.devs.get(&dev.into()).and_then(|d| d.track.as_ref());
                match (r, tracked) {
                    (Ok(Reply::CbtInfo(i)), Some(t)) => {
                        if i.generation_id.0 != t.generation.0 || i.changes_number != t.previous {
                            return Err(format!("{shown}: {i:?}, expected {t:?}"));
                        }
                    }
                    (Err(_), None) => {}
                    (r, t) => return Err(format!("{shown}: {r:?}, tracker expected: {t:?}")),
                }
            }
            _ => {}
        }
        // Wholly or not at all: a failed request changed nothing; any request leaves the
        // state the oracle expects (checked by `check` after the step).
        if !ok && !rolled_back {
            let after = self.observe()?;
            if after != before {
                return Err(format!(
                    "{shown} failed ({errno:?}) but changed the state:\n  before {before:?}\n  after  {after:?}"
                ));
            }
        }
        Ok(())
    }

    /// A take switched `dev`'s tracker: check the numbers and move the oracle's sets.
    pub(super) fn switch(&mut self, dev: DeviceId, what: &str) -> Res {
        let Some(t) = self.o.devs.get_mut(&dev).and_then(|d| d.track.as_mut()) else {
            return Ok(());
        };
        let st = self.daemon.as_ref().expect("daemon").engine().cbt_export(dev);
        let st = st.map_err(|e| format!("{what}: {dev}: tracker gone: {e:?}"))?;
        if st.generation != t.generation {
            // The wrap: a new generation, the live map cleared.
            if t.active != 255 {
                return Err(format!("{what}: {dev}: new generation without a wrap: {t:?}"));
            }
            t.generation = st.generation;
            t.since.clear();
            t.last = None;
            t.active = st.active;
            t.previous = st.previous;
            let g = st.generation;
            return self.new_generation(g, what);
        }
        if st.previous != t.active || st.active != t.active + 1 {
            return Err(format!(
                "{what}: {dev}: numbers {}/{} after a take, expected {}/{}",
                st.active,
                st.previous,
                t.active + 1,
                t.active
            ));
        }
        t.previous = st.previous;
        t.active = st.active;
        t.last = Some(std::mem::take(&mut t.since));
        Ok(())
    }
}
