//! Metadata contexts: `base:allocation` and the origin's change map as QEMU-style dirty
//! bitmaps.
//!
//! * `base:allocation`: every extent is reported as data (flags 0). That is always true (a
//!   client reads real bytes everywhere) and it is the only answer the engine can give cheaply:
//!   an image's bytes come from the origin's backing or from the difference storage chunk by
//!   chunk, and neither knows which ranges read as zeroes. Clients that skip zeroes detect them
//!   in the data they read.
//! * `qemu:dirty-bitmap:blksnap-GENERATION-since-N`: the blocks of the origin's CBT read map
//!   (the map frozen at the take that made the image) whose value is greater than `N`, in the
//!   tracker's generation `GENERATION` (its UUID, as `blksnap cbtinfo` prints it). Dirty
//!   extents carry `NBD_STATE_DIRTY` (1), clean ones 0. A take numbers its writes with the
//!   snap number it froze: a backup made from the image taken when the device's
//!   `changes_number` was `C` asks the next image for `since-C` and gets exactly the blocks
//!   written after that take. `N` ranges over `0..=changes_number` of the device (only 255
//!   at the take where the snap numbers wrap: the read map is stale then)
//!   (`since-changes_number` is always empty: it names the image's own mark, so a client learns
//!   the mark from the list). A name whose generation is not the tracker's current one, or
//!   whose `N` is above `changes_number`, is not selected (the client sees the context
//!   missing), and a generation that changes under a selected context fails its block-status
//!   requests (EIO): a client never gets a silently wrong map.

use blksnap_engine::Engine;
use blksnap_model::{DeviceId, Errno, Error, Uuid};

use super::wire::STATE_DIRTY;

/// `base:allocation`.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The namespace QEMU and libvirt use for dirty bitmaps.
pub const DIRTY_BITMAP_NS: &str = "qemu:dirty-bitmap:";
/// Most extents in one block-status chunk (the rest of the range is left for the next request,
/// as the protocol allows).
pub const MAX_EXTENTS: usize = 1 << 16;

/// A metadata context of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// Blocks changed after the take numbered `since`, in the tracker generation `generation`.
    Dirty {
        /// The tracker's generation.
        generation: Uuid,
        /// The CBT snap number the bitmap is relative to.
        since: u8,
    },
}

impl Context {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => BASE_ALLOCATION.to_string(),
            Context::Dirty { generation, since } => {
                format!("{DIRTY_BITMAP_NS}blksnap-{generation}-since-{since}")
            }
        }
    }

    /// Parses a context name (None: not one of ours).
    pub fn parse(name: &str) -> Option<Context> {
        if name == BASE_ALLOCATION {
            return Some(Context::Allocation);
        }
        let rest = name.strip_prefix(DIRTY_BITMAP_NS)?.strip_prefix("blksnap-")?;
        let (generation, since) = rest.rsplit_once("-since-")?;
        if since.is_empty() || !since.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Context::Dirty { generation: generation.parse().ok()?, since: since.parse().ok()? })
    }

    /// The id this context has on a connection (one id per name).
    pub fn id(&self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::Dirty { since, .. } => 0x100 + u32::from(*since),
        }
    }
}

/// The lowest `N` a bitmap of a device at `changes_number` can be relative to. A take at snap
/// number 255 wraps: the tracker starts a new generation at `changes_number` 255 and leaves the
/// read map as it was (stale, of the old generation), so no `since-N` below 255 is true then.
fn first_valid(changes_number: u8) -> u8 {
    if changes_number == u8::MAX {
        u8::MAX
    } else {
        0
    }
}

/// Every context `dev` has now: `base:allocation`, and with a tracker one bitmap per snap
/// number `0..=changes_number`.
pub fn available(engine: &Engine, dev: DeviceId) -> Vec<Context> {
    let mut out = vec![Context::Allocation];
    if let Ok(info) = engine.cbt_info(dev) {
        for since in first_valid(info.changes_number)..=info.changes_number {
            out.push(Context::Dirty { generation: info.generation_id, since });
        }
    }
    out
}

/// The contexts an NBD_OPT_LIST_META_CONTEXT query names: a full name, or a namespace
/// (`base:`, `qemu:`, `qemu:dirty-bitmap:`) for all of its contexts.
pub fn list_query(query: &str, available: &[Context]) -> Vec<Context> {
    let all_dirty = query == "qemu:" || query == DIRTY_BITMAP_NS;
    available
        .iter()
        .filter(|c| match c {
            Context::Allocation => query == "base:" || query == BASE_ALLOCATION,
            Context::Dirty { .. } => all_dirty || c.name() == query,
        })
        .copied()
        .collect()
}

/// The context an NBD_OPT_SET_META_CONTEXT query selects (full names only), or why none.
pub fn select(query: &str, engine: &Engine, dev: DeviceId) -> Result<Context, String> {
    let Some(ctx) = Context::parse(query) else {
        return Err(format!("{query}: no such context"));
    };
    if let Context::Dirty { generation, since } = ctx {
        let info =
            engine.cbt_info(dev).map_err(|_| format!("{query}: the device has no tracker"))?;
        if info.generation_id != generation {
            return Err(format!(
                "{query}: stale generation (the tracker is now at generation {}): a full \
                 backup is needed",
                info.generation_id
            ));
        }
        if since < first_valid(info.changes_number) {
            return Err(format!(
                "{query}: the snap numbers wrapped at this take: only since-255 (empty) is \
                 meaningful until the next take"
            ));
        }
        if since > info.changes_number {
            return Err(format!(
                "{query}: snap number {since} is ahead of the device's ({})",
                info.changes_number
            ));
        }
    }
    Ok(ctx)
}

/// The block-status descriptors `(length, flags)` of `ctx` for `[offset, offset + len)` of
/// the device `dev` of `size` bytes: consecutive, covering the range from `offset` (at most
/// [`MAX_EXTENTS`] of them, one with `req_one`). The range must be inside the device.
pub fn extents(
    ctx: Context,
    engine: &Engine,
    dev: DeviceId,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, Error> {
    let end = offset + u64::from(len);
    match ctx {
        Context::Allocation => Ok(vec![(len, 0)]),
        Context::Dirty { generation, since } => {
            let info = engine.cbt_info(dev)?;
            if info.generation_id != generation {
                return Err(Error::new(
                    Errno::EIO,
                    "the tracker's generation changed: this bitmap is no longer valid",
                ));
            }
            let bs = u64::from(info.block_size_bytes);
            let first = offset / bs;
            let last = (end - 1) / bs;
            let count = (last - first + 1).min(u64::from(info.block_count).saturating_sub(first));
            let mut map = Vec::new();
            engine.cbt_map(dev, first as u32, count as u32, &mut map)?;
            let mut out: Vec<(u32, u32)> = Vec::new();
            let limit = if req_one { 1 } else { MAX_EXTENTS };
            let push = |out: &mut Vec<(u32, u32)>, n: u32, flags: u32| -> bool {
                if let Some((l, f)) = out.last_mut() {
                    if *f == flags {
                        *l += n;
                        return true;
                    }
                }
                if out.len() == limit {
                    return false;
                }
                out.push((n, flags));
                true
            };
            let mut pos = offset;
            for (i, v) in map.iter().enumerate() {
                let block_end = ((first + i as u64 + 1) * bs).min(end);
                let flags = if *v > since { STATE_DIRTY } else { 0 };
                if !push(&mut out, (block_end - pos) as u32, flags) {
                    return Ok(out);
                }
                pos = block_end;
            }
            if pos < end {
                // Not covered by the map (only a device that grew after the tracker was made):
                // reported dirty, so that a backup copies it rather than trusting nothing.
                push(&mut out, (end - pos) as u32, STATE_DIRTY);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let g: Uuid = "01234567-89ab-cdef-0123-456789abcdef".parse().unwrap();
        let c = Context::Dirty { generation: g, since: 7 };
        assert_eq!(
            c.name(),
            "qemu:dirty-bitmap:blksnap-01234567-89ab-cdef-0123-456789abcdef-since-7"
        );
        assert_eq!(Context::parse(&c.name()), Some(c));
        assert_eq!(Context::parse("base:allocation"), Some(Context::Allocation));
        for bad in [
            "base:",
            "qemu:dirty-bitmap:",
            "qemu:dirty-bitmap:blksnap-01234567-89ab-cdef-0123-456789abcdef-since-",
            "qemu:dirty-bitmap:blksnap-01234567-89ab-cdef-0123-456789abcdef-since-256",
            "qemu:dirty-bitmap:blksnap-01234567-89ab-cdef-0123-456789abcdef-since-+1",
            "qemu:dirty-bitmap:blksnap-nonsense-since-1",
            "qemu:dirty-bitmap:other",
        ] {
            assert_eq!(Context::parse(bad), None, "{bad}");
        }
        let avail = [Context::Allocation, c];
        assert_eq!(list_query("base:", &avail), vec![Context::Allocation]);
        assert_eq!(list_query("qemu:dirty-bitmap:", &avail), vec![c]);
        assert_eq!(list_query(&c.name(), &avail), vec![c]);
        assert!(list_query("other:", &avail).is_empty());
    }
}
