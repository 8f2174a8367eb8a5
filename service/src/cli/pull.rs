//! `blksnap backup --image nbd://…`: full and incremental backups pulled from blksnapd's NBD
//! export of a snapshot image, possibly from another machine (no control socket needed).
//!
//! The backup directory is the same as for a local image (`backup.rs`): the same manifest,
//! full points and delta files, so `restore` and `verify` work unchanged. What differs is where
//! the change map comes from: the export's `qemu:dirty-bitmap:blksnap-GENERATION-since-N`
//! contexts ([`crate::nbd::contexts`]). The export lists one per snap number `0..=C`, where `C`
//! is the device's `changes_number` at the image's take — the mark recorded with the point. An
//! incremental selects `since-M`, `M` being the previous point's mark: exactly the blocks
//! written after the take the previous point was made from. A generation that changed (or a
//! mark the device is behind) is refused by the server, and the incremental with it (ESTALE:
//! make a full backup).
//!
//! Deltas of pulled chains use a fixed [`NBD_DELTA_BLOCK_BYTES`] unit (the dirty extents are
//! whole CBT blocks, themselves whole 64 KiB units with the default `tracking_block_minimum_shift`;
//! a smaller CBT block only makes a delta copy a little more than changed). A chain is made
//! either locally or over NBD: the block size recorded in the mark tells them apart.

use std::path::Path;
use std::time::{Duration, Instant};

use super::backup::{
    copy_full, load_manifest, progress, record_point, write_delta, CbtMark, Copied, Source,
    COPY_UNIT,
};
use super::error::CliError;
use super::Report;
use crate::nbd::client::{Client, NbdError, NbdUri};
use crate::nbd::contexts::{Context, DIRTY_BITMAP_NS};
use crate::nbd::wire::STATE_DIRTY;

/// The block unit of deltas pulled over NBD.
pub const NBD_DELTA_BLOCK_BYTES: u64 = 64 << 10;
/// How long one request may wait for the server.
const TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes one block-status request covers.
const STATUS_STEP_BYTES: u64 = 1 << 30;

fn nbd_err(e: NbdError) -> CliError {
    CliError::new(e.errno, e.message)
}

impl Source for Client {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), CliError> {
        self.read_at(buf, off).map_err(|e| nbd_err(e).context(format!("read at {off}")))
    }
}

/// Connections a full pull reads over (each export allows `max_connections_per_export`,
/// 8 by default; if fewer can be had, the pull uses its one connection).
const PULL_CONNECTIONS: usize = 4;
/// Units each connection reads ahead of the writer.
const PULL_DEPTH: usize = 2;

/// A full pull's reader: [`PULL_CONNECTIONS`] connections, each reading every
/// `PULL_CONNECTIONS`-th [`COPY_UNIT`] in its own thread, [`PULL_DEPTH`] units ahead; the
/// writer takes them in order. Only for `copy_full`'s access pattern (whole units, ascending).
struct Parallel {
    units: Vec<std::sync::mpsc::Receiver<Result<Vec<u8>, NbdError>>>,
    next: u64,
}

impl Parallel {
    fn start(uri: &NbdUri, contexts: &[String], size: u64) -> Option<Parallel> {
        let mut clients = Vec::new();
        for _ in 0..PULL_CONNECTIONS {
            let mut c = Client::connect(uri, contexts, TIMEOUT).ok()?;
            c.set_read_ahead(false).ok()?;
            clients.push(c);
        }
        let unit = COPY_UNIT as u64;
        let count = size.div_ceil(unit);
        let mut units = Vec::new();
        for (w, mut c) in clients.into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::sync_channel(PULL_DEPTH);
            std::thread::Builder::new()
                .name("blksnap-pull".into())
                .spawn(move || {
                    let mut i = w as u64;
                    while i < count {
                        let off = i * unit;
                        let mut buf = vec![0u8; (size - off).min(unit) as usize];
                        let read = c.read_at(&mut buf, off).map(|()| buf);
                        let failed = read.is_err();
                        if tx.send(read).is_err() || failed {
                            return; // the writer stopped, or this connection failed
                        }
                        i += PULL_CONNECTIONS as u64;
                    }
                    c.disconnect();
                })
                .ok()?;
            units.push(rx);
        }
        Some(Parallel { units, next: 0 })
    }
}

impl Source for Parallel {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), CliError> {
        if off != self.next * COPY_UNIT as u64 {
            return Err(CliError::invalid("parallel pull: reads must be whole units in order"));
        }
        let rx = &self.units[(self.next % PULL_CONNECTIONS as u64) as usize];
        let data = rx
            .recv()
            .map_err(|_| CliError::new(libc::EIO, "a pull connection ended early"))?
            .map_err(|e| nbd_err(e).context(format!("read at {off}")))?;
        if data.len() != buf.len() {
            return Err(CliError::invalid("parallel pull: unit length mismatch"));
        }
        buf.copy_from_slice(&data);
        self.next += 1;
        Ok(())
    }
}

/// The image's CBT mark from the contexts the export lists: (generation, changes_number).
fn mark_of(listed: &[String]) -> Option<(blksnap_model::Uuid, u8)> {
    listed
        .iter()
        .filter_map(|n| match Context::parse(n) {
            Some(Context::Dirty { generation, since }) => Some((generation, since)),
            _ => None,
        })
        .max_by_key(|(_, since)| *since)
}

/// The 64 KiB units that `client`'s selected context `ctx` marks dirty.
fn dirty_units(client: &mut Client, ctx: &str, size: u64) -> Result<Vec<u64>, CliError> {
    let mut units: Vec<u64> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(STATUS_STEP_BYTES) as u32;
        let ext = client.block_status(ctx, off, len).map_err(nbd_err)?;
        for (start, l, flags) in &ext {
            if flags & STATE_DIRTY != 0 {
                let end = (start + u64::from(*l)).min(size);
                let first = start / NBD_DELTA_BLOCK_BYTES;
                let last = (end - 1) / NBD_DELTA_BLOCK_BYTES;
                for u in first..=last {
                    if units.last().is_none_or(|p| *p < u) {
                        units.push(u);
                    }
                }
            }
        }
        let covered: u64 = ext.iter().map(|(_, l, _)| u64::from(*l)).sum();
        off += covered.min(size - off);
    }
    Ok(units)
}

/// `blksnap backup --image NBD-URI`.
pub fn backup_nbd(
    uri_text: &str,
    dir: &Path,
    force_full: bool,
    json: bool,
) -> Result<Report, CliError> {
    let started = Instant::now();
    let uri = NbdUri::parse(uri_text).map_err(nbd_err)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::io(format!("create {}", dir.display()), &e))?;
    let mut manifest = load_manifest(dir)?;
    let last = manifest.points.last().cloned();
    let incremental = !force_full && last.is_some();
    let n = manifest.points.len() as u32;
    let mut since_ctx = None;
    if incremental {
        let last = last.as_ref().expect("checked");
        let Some(prev) = &last.cbt else {
            return Err(CliError::invalid(format!(
                "the last backup (point {}) has no change-tracking mark: a full backup is \
                 needed (--full)",
                last.n
            )));
        };
        if prev.block_size != NBD_DELTA_BLOCK_BYTES as u32 {
            return Err(CliError::invalid(
                "the last backup of this directory was not pulled over NBD (its deltas use the \
                 CBT block size): a chain is made one way; start a new one with --full",
            ));
        }
        let generation: blksnap_model::Uuid = prev
            .generation_id
            .parse()
            .map_err(|_| CliError::invalid("the manifest's generation id is not a UUID"))?;
        since_ctx = Some(Context::Dirty { generation, since: prev.changes_number }.name());
    }
    let wanted: Vec<String> = since_ctx.iter().cloned().collect();
    let mut client = match Client::connect(&uri, &wanted, TIMEOUT) {
        Err(e) if e.errno == libc::ESTALE => {
            let prev = last.as_ref().and_then(|l| l.cbt.clone()).expect("incremental");
            return Err(CliError::new(
                libc::ESTALE,
                format!(
                    "generation changed: a full backup is needed (the last backup is of \
                     generation {} at change number {}, which the export no longer offers as \
                     {DIRTY_BITMAP_NS}…; rerun with --full)",
                    prev.generation_id, prev.changes_number
                ),
            ));
        }
        other => other.map_err(nbd_err)?,
    };
    let size = client.size_bytes();
    let mark = mark_of(client.listed_contexts());
    let pb = progress(size, json);
    let mut parallel = false;
    let (kind, file, bytes_read, bytes_written, blocks_changed, blocks_total) =
        if let Some(ctx) = &since_ctx {
            let last = last.as_ref().expect("incremental");
            if last.image_size != size {
                return Err(CliError::new(
                    libc::ESTALE,
                    format!(
                        "the export is {size} bytes, the last backup {} bytes: a full backup is \
                     needed (--full)",
                        last.image_size
                    ),
                ));
            }
            let units = dirty_units(&mut client, ctx, size)?;
            let bs = NBD_DELTA_BLOCK_BYTES;
            let changed_bytes: u64 = units.iter().map(|i| bs.min(size - i * bs)).sum();
            pb.set_length(changed_bytes);
            let file = format!("point-{n:04}.delta");
            let written = write_delta(&mut client, &dir.join(&file), bs, size, &units, &pb)?;
            let total = size.div_ceil(bs);
            ("incremental", file, changed_bytes, written, units.len() as u64, total as u32)
        } else {
            let file = format!("point-{n:04}.img");
            let (read, written) = match Parallel::start(&uri, &wanted, size) {
                Some(mut par) => {
                    parallel = true;
                    copy_full(&mut par, &dir.join(&file), size, &pb)?
                }
                None => copy_full(&mut client, &dir.join(&file), size, &pb)?,
            };
            let total = size.div_ceil(NBD_DELTA_BLOCK_BYTES) as u32;
            ("full", file, read, written, u64::from(total), total)
        };
    pb.finish_and_clear();
    // The snapshot must still be intact after the last read (a snapshot that failed during the
    // pull fails image reads from then on, and a destroyed one has no export): one more read.
    // The first connection sat idle during a parallel copy (the server may have closed it
    // at its idle timeout): the check gets a connection of its own then.
    let mut probe = [0u8; 512];
    let checked = if parallel {
        client = Client::connect(&uri, &[], TIMEOUT).map_err(nbd_err)?;
        client.read_exact_at(&mut probe[..size.min(512) as usize], 0)
    } else {
        client.read_exact_at(&mut probe[..size.min(512) as usize], 0)
    };
    if let Err(e) = checked {
        let _ = std::fs::remove_file(dir.join(&file));
        return Err(CliError::new(
            libc::EIO,
            format!(
                "the image failed or went away during the pull ({}): the point is not recorded",
                e.message
            ),
        ));
    }
    client.disconnect();
    let cbt = mark.map(|(generation, changes)| CbtMark {
        generation_id: generation.to_string(),
        changes_number: changes,
        block_size: NBD_DELTA_BLOCK_BYTES as u32,
        block_count: blocks_total,
    });
    let copied = Copied { kind, file, bytes_read, bytes_written, blocks_changed, blocks_total };
    record_point(dir, &mut manifest, copied, uri_text.to_string(), size, None, cbt, started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_the_highest_listed_number() {
        let g: blksnap_model::Uuid = "01234567-89ab-cdef-0123-456789abcdef".parse().unwrap();
        let names: Vec<String> = [0u8, 3, 1]
            .iter()
            .map(|n| Context::Dirty { generation: g, since: *n }.name())
            .chain(["base:allocation".to_string()])
            .collect();
        assert_eq!(mark_of(&names), Some((g, 3)));
        assert_eq!(mark_of(&["base:allocation".to_string()]), None);
    }
}
