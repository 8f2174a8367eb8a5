//! Fault injection as a wrapper: [`FaultDev`] delegates every call to an inner device after
//! asking a [`FaultPlan`] whether this one should fail. One plan may be shared by several
//! wrappers (e.g. every storage backend of the engine), so rules and counters see the I/O of
//! all of them in one order.
//!
//! Every `read_at`, `write_at`, `write_zeroes_at`, `set_len` and `flush` is counted (0-based
//! op index, in the order the plan sees them); `len_bytes` and `can_grow` are not. Each op fires
//! at most one rule, chosen in this order:
//! 1. the oldest rule pinned to this op index (`at_op == Some(i)`) whose kind matches;
//! 2. for `set_len`, the oldest [`FaultPlan::fail_set_len`] rule;
//! 3. for reads and writes, the oldest unpinned rule whose kind matches (`None` = any).
//!
//! `write_zeroes_at` is an [`IoKind::Write`]. `set_len` and `flush` have no kind: only pinned
//! rules with `kind: None` (and `fail_set_len`) reach them. A pinned rule whose op has passed
//! without firing (its kind did not match) is dropped. A failed I/O never reaches the inner
//! device, except the prefix of a [`Fault::Torn`] write.

use core::fmt;
use std::collections::VecDeque;

use blksnap_model::{Errno, Error, IoKind, Result, SECTOR_SIZE_BYTES};

use super::{BlockDev, Dev};
use crate::sync::{Arc, LockRank, Mutex};

/// What a fired rule does to the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The I/O fails with this errno and touches nothing.
    Error(Errno),
    /// A torn write: only the first `sectors_written` sectors of the buffer reach the inner
    /// device (all of it if shorter), then the write fails with `errno`. Other I/O behaves as
    /// [`Fault::Error`].
    Torn {
        /// 512-byte sectors written before the failure.
        sectors_written: u64,
        /// What the caller sees.
        errno: Errno,
    },
}

impl Fault {
    /// The errno the failed I/O returns.
    pub fn errno(self) -> Errno {
        match self {
            Fault::Error(errno) | Fault::Torn { errno, .. } => errno,
        }
    }

    /// Bytes of a `len_bytes` write that a torn write lets through (0 for [`Fault::Error`]).
    fn prefix_bytes(self, len_bytes: u64) -> u64 {
        match self {
            Fault::Error(_) => 0,
            Fault::Torn { sectors_written, .. } => {
                sectors_written.saturating_mul(SECTOR_SIZE_BYTES).min(len_bytes)
            }
        }
    }

    fn into_error(self) -> Error {
        Error::new(self.errno(), "injected fault")
    }
}

/// A rule, as plain data: which I/O fails and how.
///
/// `kind: None` matches any kind; `at_op: None` means "the next matching I/O", `Some(i)` means
/// "the I/O with op index `i`, if its kind matches".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    /// Read or write; `None` = any.
    pub kind: Option<IoKind>,
    /// The 0-based op index the rule is pinned to; `None` = the next match.
    pub at_op: Option<u64>,
    /// What happens.
    pub fault: Fault,
}

/// The counted operations; `kind()` maps them onto the rules' vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    SetLen,
    Flush,
}

impl Op {
    fn kind(self) -> Option<IoKind> {
        match self {
            Op::Read => Some(IoKind::Read),
            Op::Write => Some(IoKind::Write),
            Op::SetLen | Op::Flush => None,
        }
    }
}

/// Rules and counters, under one lock so that numbering and matching agree.
#[derive(Debug, Default)]
struct PlanState {
    ops_seen: u64,
    faults_fired: u64,
    /// Read/write rules in insertion order (FIFO per kind falls out of scanning in order).
    rules: Vec<FaultSpec>,
    set_len_errnos: VecDeque<Errno>,
}

impl PlanState {
    /// Removes and returns the oldest rule satisfying `pred`.
    fn take_rule(&mut self, pred: impl Fn(&FaultSpec) -> bool) -> Option<Fault> {
        let index = self.rules.iter().position(pred)?;
        Some(self.rules.remove(index).fault)
    }

    /// Numbers `op`, picks at most one rule for it (module docs give the order), counts it.
    fn decide(&mut self, op: Op) -> Option<Fault> {
        let index = self.ops_seen;
        self.ops_seen += 1;
        let kind_matches = |spec: &FaultSpec| spec.kind.is_none() || spec.kind == op.kind();
        let fault = self
            .take_rule(|s| s.at_op == Some(index) && kind_matches(s))
            .or_else(|| self.take_set_len(op))
            .or_else(|| match op.kind() {
                Some(_) => self.take_rule(|s| s.at_op.is_none() && kind_matches(s)),
                None => None,
            });
        // A pinned rule at or before this op can never fire again.
        self.rules.retain(|s| s.at_op.is_none_or(|at| at > index));
        self.faults_fired += u64::from(fault.is_some());
        fault
    }

    fn take_set_len(&mut self, op: Op) -> Option<Fault> {
        match op {
            Op::SetLen => self.set_len_errnos.pop_front().map(Fault::Error),
            _ => None,
        }
    }
}

/// Shared fault rules and counters. Create it, wrap devices with [`FaultDev`] holding clones of
/// the same `Arc`, and add rules at any time.
#[derive(Debug)]
pub struct FaultPlan {
    state: Mutex<PlanState>,
}

impl Default for FaultPlan {
    fn default() -> FaultPlan {
        FaultPlan::new()
    }
}

impl FaultPlan {
    /// An empty plan: nothing fails.
    pub fn new() -> FaultPlan {
        FaultPlan { state: Mutex::new(LockRank::FaultPlan, PlanState::default()) }
    }

    /// An empty plan, ready to share.
    pub fn shared() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::new())
    }

    /// Adds a rule (see [`FaultSpec`] and the module docs for matching).
    pub fn add(&self, spec: FaultSpec) {
        self.state.lock().rules.push(spec);
    }

    /// The next I/O of `kind` fails with `fault` (rules of one kind fire in the order added).
    pub fn fail_next(&self, kind: IoKind, fault: Fault) {
        self.add(FaultSpec { kind: Some(kind), at_op: None, fault });
    }

    /// The counted op with 0-based index `op_index`, whatever its kind, fails with `fault`.
    pub fn fail_at(&self, op_index: u64, fault: Fault) {
        self.add(FaultSpec { kind: None, at_op: Some(op_index), fault });
    }

    /// The next `set_len` fails with `errno` (e.g. ENOSPC for a full file system).
    pub fn fail_set_len(&self, errno: Errno) {
        self.state.lock().set_len_errnos.push_back(errno);
    }

    /// Drops every pending rule; the counters keep counting.
    pub fn clear(&self) {
        let mut state = self.state.lock();
        state.rules.clear();
        state.set_len_errnos.clear();
    }

    /// Ops counted so far (the index the next op will get).
    pub fn ops_seen(&self) -> u64 {
        self.state.lock().ops_seen
    }

    /// Rules that have fired so far.
    pub fn faults_fired(&self) -> u64 {
        self.state.lock().faults_fired
    }

    /// Rules still waiting to fire.
    pub fn pending(&self) -> usize {
        let state = self.state.lock();
        state.rules.len() + state.set_len_errnos.len()
    }

    fn decide(&self, op: Op) -> Option<Fault> {
        self.state.lock().decide(op)
    }
}

/// A device whose I/O goes through a [`FaultPlan`] first.
pub struct FaultDev {
    /// The device that does the I/O.
    pub inner: Dev,
    /// The rules, possibly shared with other wrappers.
    pub plan: Arc<FaultPlan>,
}

impl FaultDev {
    /// Wraps `inner` under `plan`.
    pub fn new(inner: Dev, plan: Arc<FaultPlan>) -> FaultDev {
        FaultDev { inner, plan }
    }
}

impl fmt::Debug for FaultDev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultDev")
            .field("len_bytes", &self.inner.len_bytes())
            .field("plan", &self.plan)
            .finish()
    }
}

impl BlockDev for FaultDev {
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        match self.plan.decide(Op::Read) {
            Some(fault) => Err(fault.into_error()),
            None => self.inner.read_at(buf, offset_bytes),
        }
    }

    /// A torn write's prefix is written even if the caller's range is bad: the inner device
    /// rejects it then, and the injected errno is what the caller sees either way.
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        let Some(fault) = self.plan.decide(Op::Write) else {
            return self.inner.write_at(buf, offset_bytes);
        };
        let prefix_bytes = fault.prefix_bytes(buf.len() as u64) as usize;
        if prefix_bytes > 0 {
            let _ = self.inner.write_at(&buf[..prefix_bytes], offset_bytes);
        }
        Err(fault.into_error())
    }

    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let Some(fault) = self.plan.decide(Op::Write) else {
            return self.inner.write_zeroes_at(offset_bytes, len_bytes);
        };
        let prefix_bytes = fault.prefix_bytes(len_bytes);
        if prefix_bytes > 0 {
            let _ = self.inner.write_zeroes_at(offset_bytes, prefix_bytes);
        }
        Err(fault.into_error())
    }

    fn flush(&self) -> Result<()> {
        match self.plan.decide(Op::Flush) {
            Some(fault) => Err(fault.into_error()),
            None => self.inner.flush(),
        }
    }

    fn can_grow(&self) -> bool {
        self.inner.can_grow()
    }

    fn set_len(&self, len_bytes: u64) -> Result<()> {
        match self.plan.decide(Op::SetLen) {
            Some(fault) => Err(fault.into_error()),
            None => self.inner.set_len(len_bytes),
        }
    }
}

// The facade's primitives belong to the checker under loom/shuttle and cannot be created outside
// a checked execution, so these unit tests run on the std backend only.
#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;
    use crate::io::MemDev;
    use crate::sync::StdArc;

    const LEN_BYTES: u64 = 64 * 1024;

    /// A wrapper over a fresh memory device; the inner handle lets tests look behind the plan.
    fn setup() -> (FaultDev, StdArc<MemDev>, Arc<FaultPlan>) {
        let mem = StdArc::new(MemDev::growable(LEN_BYTES, 4 * LEN_BYTES));
        let plan = FaultPlan::shared();
        let inner: Dev = mem.clone();
        (FaultDev::new(inner, Arc::clone(&plan)), mem, plan)
    }

    fn errno(r: Result<()>) -> Option<Errno> {
        r.err().map(|e| e.errno)
    }

    fn read(dev: &dyn BlockDev, offset_bytes: u64, len_bytes: usize) -> Vec<u8> {
        let mut buf = vec![0xAAu8; len_bytes];
        dev.read_at(&mut buf, offset_bytes).unwrap();
        buf
    }

    #[test]
    fn no_rules_is_transparent() {
        let (dev, mem, plan) = setup();
        dev.write_at(&[1u8; 1024], 512).unwrap();
        assert_eq!(read(&dev, 512, 1024), vec![1u8; 1024]);
        assert_eq!(read(&*mem, 512, 1024), vec![1u8; 1024]);
        dev.write_zeroes_at(512, 512).unwrap();
        dev.flush().unwrap();
        dev.set_len(2 * LEN_BYTES).unwrap();
        assert_eq!(dev.len_bytes(), 2 * LEN_BYTES);
        assert!(dev.can_grow());
        assert_eq!(plan.ops_seen(), 5, "len_bytes, can_grow and inner I/O are not counted");
        assert_eq!(plan.faults_fired(), 0);
        assert!(format!("{dev:?}").contains("FaultDev"));
    }

    #[test]
    fn fail_next_fires_once_and_touches_nothing() {
        let (dev, mem, plan) = setup();
        plan.fail_next(IoKind::Write, Fault::Error(Errno::EIO));
        let _ = read(&dev, 0, 512); // a read does not consume a write rule
        assert_eq!(errno(dev.write_at(&[7u8; 512], 0)), Some(Errno::EIO));
        assert_eq!(mem.allocated_bytes(), 0, "the failed write never reached the device");
        dev.write_at(&[7u8; 512], 0).unwrap();
        assert_eq!(read(&*mem, 0, 512), vec![7u8; 512]);
        assert_eq!((plan.ops_seen(), plan.faults_fired(), plan.pending()), (3, 1, 0));
    }

    #[test]
    fn rules_of_one_kind_fire_in_order() {
        let (dev, _mem, plan) = setup();
        plan.fail_next(IoKind::Read, Fault::Error(Errno::EIO));
        plan.fail_next(IoKind::Write, Fault::Error(Errno::ENOSPC));
        plan.fail_next(IoKind::Read, Fault::Error(Errno::ENODATA));
        plan.fail_next(IoKind::Write, Fault::Error(Errno::EFAULT));
        let mut buf = [0u8; 512];
        assert_eq!(errno(dev.write_at(&buf, 0)), Some(Errno::ENOSPC));
        assert_eq!(errno(dev.read_at(&mut buf, 0)), Some(Errno::EIO));
        assert_eq!(errno(dev.read_at(&mut buf, 0)), Some(Errno::ENODATA));
        assert_eq!(errno(dev.write_zeroes_at(0, 512)), Some(Errno::EFAULT));
        assert_eq!(errno(dev.read_at(&mut buf, 0)), None);
        assert_eq!(errno(dev.write_at(&buf, 0)), None);
        assert_eq!(plan.faults_fired(), 4);
    }

    #[test]
    fn write_zeroes_counts_as_a_write() {
        let (dev, mem, plan) = setup();
        dev.write_at(&[3u8; 512], 0).unwrap();
        plan.fail_next(IoKind::Write, Fault::Error(Errno::EIO));
        assert_eq!(errno(dev.write_zeroes_at(0, 512)), Some(Errno::EIO));
        assert_eq!(read(&*mem, 0, 512), vec![3u8; 512], "the failed zeroing changed nothing");
    }

    #[test]
    fn fail_at_counts_every_op() {
        let (dev, _mem, plan) = setup();
        plan.fail_at(3, Fault::Error(Errno::EIO));
        plan.fail_at(5, Fault::Error(Errno::ENOSPC));
        let mut buf = [0u8; 512];
        assert_eq!(errno(dev.read_at(&mut buf, 0)), None); // 0
        assert_eq!(errno(dev.flush()), None); // 1
        assert_eq!(errno(dev.set_len(LEN_BYTES)), None); // 2
        assert_eq!(errno(dev.flush()), Some(Errno::EIO)); // 3
        assert_eq!(errno(dev.write_at(&buf, 0)), None); // 4
        assert_eq!(errno(dev.set_len(2 * LEN_BYTES)), Some(Errno::ENOSPC)); // 5
        assert_eq!(dev.len_bytes(), LEN_BYTES);
        assert_eq!(errno(dev.read_at(&mut buf, 0)), None); // 6
        assert_eq!((plan.ops_seen(), plan.faults_fired()), (7, 2));
    }

    #[test]
    fn pinned_rule_of_the_wrong_kind_expires() {
        let (dev, _mem, plan) = setup();
        plan.add(FaultSpec {
            kind: Some(IoKind::Write),
            at_op: Some(0),
            fault: Fault::Error(Errno::EIO),
        });
        plan.add(FaultSpec {
            kind: Some(IoKind::Read),
            at_op: Some(1),
            fault: Fault::Error(Errno::EFAULT),
        });
        let mut buf = [0u8; 512];
        assert_eq!(errno(dev.read_at(&mut buf, 0)), None, "op 0 is a read, the rule wants a write");
        assert_eq!(plan.pending(), 1, "the op-0 rule is gone");
        assert_eq!(errno(dev.read_at(&mut buf, 0)), Some(Errno::EFAULT));
        assert_eq!(errno(dev.write_at(&buf, 0)), None);
        assert_eq!(plan.faults_fired(), 1);
    }

    #[test]
    fn pinned_rule_wins_over_a_next_rule() {
        let (dev, _mem, plan) = setup();
        plan.fail_next(IoKind::Write, Fault::Error(Errno::ENOSPC));
        plan.fail_at(0, Fault::Error(Errno::EIO));
        assert_eq!(errno(dev.write_at(&[0u8; 512], 0)), Some(Errno::EIO));
        assert_eq!(errno(dev.write_at(&[0u8; 512], 0)), Some(Errno::ENOSPC));
    }

    #[test]
    fn any_kind_next_rule() {
        let (dev, _mem, plan) = setup();
        plan.add(FaultSpec { kind: None, at_op: None, fault: Fault::Error(Errno::EIO) });
        assert_eq!(errno(dev.flush()), None, "flush has no kind");
        assert_eq!(errno(dev.read_at(&mut [0u8; 512], 0)), Some(Errno::EIO));
        assert_eq!(errno(dev.read_at(&mut [0u8; 512], 0)), None);
    }

    #[test]
    fn fail_set_len_fires_once() {
        let (dev, _mem, plan) = setup();
        plan.fail_set_len(Errno::ENOSPC);
        plan.fail_set_len(Errno::EIO);
        dev.write_at(&[0u8; 512], 0).unwrap();
        assert_eq!(errno(dev.set_len(2 * LEN_BYTES)), Some(Errno::ENOSPC));
        assert_eq!(dev.len_bytes(), LEN_BYTES, "the failed resize never reached the device");
        assert_eq!(errno(dev.set_len(2 * LEN_BYTES)), Some(Errno::EIO));
        dev.set_len(2 * LEN_BYTES).unwrap();
        assert_eq!(dev.len_bytes(), 2 * LEN_BYTES);
        assert_eq!(plan.faults_fired(), 2);
    }

    #[test]
    fn torn_write_leaves_exactly_the_prefix() {
        let (dev, mem, plan) = setup();
        plan.fail_next(IoKind::Write, Fault::Torn { sectors_written: 3, errno: Errno::EIO });
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        assert_eq!(errno(dev.write_at(&data, 1024)), Some(Errno::EIO));
        assert_eq!(read(&*mem, 1024, 1536), data[..1536].to_vec());
        assert!(read(&*mem, 1024 + 1536, 4096 - 1536).iter().all(|b| *b == 0));
        assert!(read(&*mem, 0, 1024).iter().all(|b| *b == 0));
    }

    #[test]
    fn torn_longer_than_the_buffer_writes_it_all_and_still_fails() {
        let (dev, mem, plan) = setup();
        plan.fail_next(IoKind::Write, Fault::Torn { sectors_written: 100, errno: Errno::ENOSPC });
        assert_eq!(errno(dev.write_at(&[5u8; 1024], 0)), Some(Errno::ENOSPC));
        assert_eq!(read(&*mem, 0, 1024), vec![5u8; 1024]);
    }

    #[test]
    fn torn_zeroes_and_torn_read() {
        let (dev, mem, plan) = setup();
        mem.write_at(&[8u8; 2048], 0).unwrap();
        plan.fail_next(IoKind::Write, Fault::Torn { sectors_written: 1, errno: Errno::EIO });
        plan.fail_next(IoKind::Read, Fault::Torn { sectors_written: 1, errno: Errno::EIO });
        assert_eq!(errno(dev.write_zeroes_at(0, 2048)), Some(Errno::EIO));
        let got = read(&*mem, 0, 2048);
        assert!(got[..512].iter().all(|b| *b == 0) && got[512..].iter().all(|b| *b == 8));
        let mut buf = [0xCCu8; 512];
        assert_eq!(errno(dev.read_at(&mut buf, 512)), Some(Errno::EIO));
        assert_eq!(buf, [0xCCu8; 512], "a failed read leaves the buffer alone");
        let zero_torn = Fault::Torn { sectors_written: 0, errno: Errno::EIO };
        plan.fail_next(IoKind::Write, zero_torn);
        assert_eq!(errno(dev.write_at(&[1u8; 512], 1024)), Some(Errno::EIO));
        assert_eq!(read(&*mem, 1024, 512), vec![8u8; 512]);
    }

    #[test]
    fn one_plan_shared_by_two_devices() {
        let plan = FaultPlan::shared();
        let a = FaultDev::new(StdArc::new(MemDev::new(LEN_BYTES)), Arc::clone(&plan));
        let b = FaultDev::new(StdArc::new(MemDev::new(LEN_BYTES)), Arc::clone(&plan));
        plan.fail_next(IoKind::Write, Fault::Error(Errno::EIO));
        plan.fail_at(2, Fault::Error(Errno::ENODATA));
        assert_eq!(errno(b.write_at(&[0u8; 512], 0)), Some(Errno::EIO));
        assert_eq!(errno(a.write_at(&[0u8; 512], 0)), None);
        assert_eq!(errno(a.read_at(&mut [0u8; 512], 0)), Some(Errno::ENODATA));
        assert_eq!((plan.ops_seen(), plan.faults_fired()), (3, 2));
    }

    #[test]
    fn clear_drops_rules_but_keeps_counters() {
        let (dev, _mem, plan) = setup();
        plan.fail_next(IoKind::Read, Fault::Error(Errno::EIO));
        plan.fail_at(10, Fault::Error(Errno::EIO));
        plan.fail_set_len(Errno::ENOSPC);
        dev.write_at(&[0u8; 512], 0).unwrap();
        assert_eq!(plan.pending(), 3);
        plan.clear();
        assert_eq!(plan.pending(), 0);
        dev.read_at(&mut [0u8; 512], 0).unwrap();
        dev.set_len(LEN_BYTES).unwrap();
        assert_eq!((plan.ops_seen(), plan.faults_fired()), (3, 0));
    }

    #[test]
    fn past_end_errors_pass_through_and_count() {
        let (dev, _mem, plan) = setup();
        assert_eq!(errno(dev.write_at(&[0u8; 512], LEN_BYTES)), Some(Errno::EIO));
        assert_eq!((plan.ops_seen(), plan.faults_fired()), (1, 0));
    }
}
