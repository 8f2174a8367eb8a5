//! `backup`, `restore`, `verify`: full and incremental backups of a snapshot image.
//!
//! A backup directory holds `manifest.json` and one file per point:
//! * a **full** point `point-NNNN.img`: the image, byte for byte (zero runs left as holes);
//! * an **incremental** point `point-NNNN.delta`: the blocks whose change-map value is above the
//!   `changes_number` recorded with the previous point (the CBT blocks written since the take
//!   that point was made from). Layout: magic `BLKSNAPD`, format `u32`, block size `u32`, image
//!   size `u64`, block count `u64` (32 bytes, little-endian), then the block indices (`u64`
//!   each, ascending), then each block's bytes in the same order (the last block of the image
//!   may be short).
//!
//! Each point records the CBT mark it was made at — generation id and `changes_number` of the
//! device at the take — so the next incremental knows which blocks changed since. A new CBT
//! generation (the tracker was re-attached, the daemon restarted uncleanly, the numbers wrapped)
//! means the map cannot say what changed since the mark: the incremental is refused and a full
//! backup (`--full`) starts a new chain in the same directory.
//!
//! Point N is rebuilt from the newest full point at or before N plus every delta after it, up to
//! N, in order (`restore` writes it, `verify` compares it with an image), streaming.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::backend::{unexpected, Backend};
use super::error::CliError;
use super::{cbt_info, cbt_map, Report};
use blksnap_model::Uuid;
use blksnap_proto::{Dev, Reply, Request};

const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;
const DELTA_MAGIC: &[u8; 8] = b"BLKSNAPD";
const DELTA_HEADER: u64 = 32;
/// I/O unit of full copies and of rebuilding a full-only chain.
pub(crate) const COPY_UNIT: usize = 1 << 20;

/// The backup directory's index.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Manifest {
    /// Manifest format.
    pub format: u32,
    /// Points, oldest first (`n` = index).
    pub points: Vec<Point>,
}

/// A CBT position: what the device's change map said at the take the point was made from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CbtMark {
    /// The tracker's generation id.
    pub generation_id: String,
    /// `changes_number` at the take.
    pub changes_number: u8,
    /// CBT block size in bytes.
    pub block_size: u32,
    /// Number of CBT blocks.
    pub block_count: u32,
}

/// One backup point.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Point {
    /// Index.
    pub n: u32,
    /// `full` or `incremental`.
    pub kind: String,
    /// Data file in the directory.
    pub file: String,
    /// Seconds since the epoch.
    pub time: u64,
    /// The image that was read.
    pub image: String,
    /// Image size in bytes.
    pub image_size: u64,
    /// The tracked device, if given.
    pub device: Option<String>,
    /// The CBT mark (absent if made without `--device`: no incremental can follow).
    pub cbt: Option<CbtMark>,
    /// Bytes written to the data file (data only).
    pub bytes_written: u64,
    /// CBT blocks copied (incrementals).
    pub blocks_changed: u64,
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CliError {
    move |e| CliError::io(what, &e)
}

/// Where a backup reads the image from: a file or device, or an NBD export ([`super::pull`]).
pub(crate) trait Source {
    /// Fills `buf` from `off`.
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), CliError>;
}

/// An image file or block device.
struct FileSource<'a> {
    file: &'a File,
    path: &'a Path,
}

impl Source for FileSource<'_> {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), CliError> {
        read_full(self.file, buf, off, self.path)
    }
}

/// Size of a file or block device (seek to its end).
pub fn size_of(f: &File) -> Result<u64, CliError> {
    let mut f = f;
    f.seek(SeekFrom::End(0)).map_err(io("size of the image"))
}

fn read_full(f: &File, buf: &mut [u8], off: u64, what: &Path) -> Result<(), CliError> {
    f.read_exact_at(buf, off).map_err(io(format!("read {} at {off}", what.display())))
}

/// Loads `DIR/manifest.json` (an empty manifest if there is none).
pub fn load_manifest(dir: &Path) -> Result<Manifest, CliError> {
    match std::fs::read(dir.join(MANIFEST)) {
        Ok(bytes) => {
            let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                CliError::new(libc::EPROTO, format!("{}: {e}", dir.join(MANIFEST).display()))
            })?;
            if m.format != FORMAT {
                return Err(CliError::invalid(format!(
                    "{}: manifest format {} (this tool reads {FORMAT})",
                    dir.display(),
                    m.format
                )));
            }
            Ok(m)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(Manifest { format: FORMAT, points: Vec::new() })
        }
        Err(e) => Err(CliError::io(dir.join(MANIFEST).display(), &e)),
    }
}

pub(crate) fn save_manifest(dir: &Path, m: &Manifest) -> Result<(), CliError> {
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let text = serde_json::to_vec_pretty(m).map_err(|e| CliError::invalid(e.to_string()))?;
    let mut f = File::create(&tmp).map_err(io(tmp.display()))?;
    f.write_all(&text).map_err(io(tmp.display()))?;
    f.sync_all().map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(io("manifest"))
}

pub(crate) fn progress(total: u64, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

/// EIO (with the snapshot's own error) if the snapshot of `dev` has failed: its image no longer
/// holds the point in time (the kernel keeps serving reads of copied chunks, and a read racing
/// the failure may have completed just before it).
fn snapshot_intact(b: &mut dyn Backend, dev: Dev, name: &str) -> Result<(), CliError> {
    match b.call(Request::SnapshotInfo { dev })? {
        Reply::SnapshotInfo { error_code: 0, .. } => Ok(()),
        Reply::SnapshotInfo { error_code, .. } => Err(CliError::new(
            libc::EIO,
            format!(
                "the snapshot of {name} failed during the backup (error {error_code}): the \
                 point is not recorded; fix the cause (e.g. more difference storage) and take \
                 a new snapshot"
            ),
        )),
        other => Err(unexpected(&other)),
    }
}

/// `blksnap backup`.
pub fn backup(
    b: &mut dyn Backend,
    image: &Path,
    dir: &Path,
    device: Option<&str>,
    force_full: bool,
    json: bool,
) -> Result<Report, CliError> {
    let started = Instant::now();
    let img = File::open(image).map_err(io(format!("open the image {}", image.display())))?;
    let image_size = size_of(&img)?;
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let mut manifest = load_manifest(dir)?;
    let mark = match device {
        Some(name) => {
            let dev = b.device(name)?;
            let info = cbt_info(b, dev)?;
            if info.device_capacity_bytes != image_size {
                return Err(CliError::invalid(format!(
                    "the image is {image_size} bytes but {name} is {} bytes: not its snapshot",
                    info.device_capacity_bytes
                )));
            }
            Some((dev, info))
        }
        None => None,
    };
    let last = manifest.points.last().cloned();
    let incremental = !force_full && last.is_some();
    let n = manifest.points.len() as u32;
    let pb = progress(image_size, json);
    let (kind, file, bytes_read, bytes_written, blocks_changed, blocks_total) = if incremental {
        let last = last.expect("checked");
        let Some((dev, info)) = mark else {
            return Err(CliError::invalid(
                "an incremental backup needs --device (the tracked device whose change map \
                 says what changed); use --full for a full one",
            ));
        };
        let Some(prev) = &last.cbt else {
            return Err(CliError::invalid(format!(
                "the last backup (point {}) has no change-tracking mark (it was made without \
                 --device): a full backup is needed (--full)",
                last.n
            )));
        };
        let generation = Uuid::from(info.generation_id).to_string();
        // A mark ahead of the device's number is stale too: after the snap numbers wrap (a take
        // at 255) the new generation starts at changes number 255 with the old read map, and
        // the next take numbers from 1 — `> 255` would find nothing changed.
        if prev.generation_id != generation
            || prev.block_size != info.block_size_bytes
            || last.image_size != image_size
            || prev.changes_number > info.changes_number
        {
            return Err(CliError::new(
                libc::ESTALE,
                format!(
                    "generation changed: a full backup is needed (the last backup is of \
                     generation {}, the device is now at {generation}; rerun with --full)",
                    prev.generation_id
                ),
            ));
        }
        let map = cbt_map(b, dev, info.block_count)?;
        let changed: Vec<u64> = map
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > prev.changes_number)
            .map(|(i, _)| i as u64)
            .collect();
        let bs = u64::from(info.block_size_bytes);
        let changed_bytes: u64 =
            changed.iter().map(|i| bs.min(image_size.saturating_sub(i * bs))).sum();
        pb.set_length(changed_bytes);
        let file = format!("point-{n:04}.delta");
        let mut src = FileSource { file: &img, path: image };
        let written = write_delta(&mut src, &dir.join(&file), bs, image_size, &changed, &pb)?;
        ("incremental", file, changed_bytes, written, changed.len() as u64, info.block_count)
    } else {
        let file = format!("point-{n:04}.img");
        let mut src = FileSource { file: &img, path: image };
        let (read, written) = copy_full(&mut src, &dir.join(&file), image_size, &pb)?;
        let blocks = mark.as_ref().map_or(0, |(_, i)| i.block_count);
        ("full", file, read, written, u64::from(blocks), blocks)
    };
    pb.finish_and_clear();
    if let Some((dev, _)) = &mark {
        // Every read above succeeded, but a snapshot that failed during the copy is no point to
        // restore to: record it only if the snapshot is still intact now, after the last read.
        if let Err(e) = snapshot_intact(b, *dev, device.unwrap_or_default()) {
            // Best effort: the point file is unreferenced either way.
            let _ = std::fs::remove_file(dir.join(&file));
            return Err(e);
        }
    }
    let cbt = mark.as_ref().map(|(_, i)| CbtMark {
        generation_id: Uuid::from(i.generation_id).to_string(),
        changes_number: i.changes_number,
        block_size: i.block_size_bytes,
        block_count: i.block_count,
    });
    let copied = Copied { kind, file, bytes_read, bytes_written, blocks_changed, blocks_total };
    let image = image.display().to_string();
    record_point(dir, &mut manifest, copied, image, image_size, device, cbt, started)
}

/// What one backup copied into its point file.
pub(crate) struct Copied {
    /// `full` or `incremental`.
    pub kind: &'static str,
    /// The point file's name in the backup directory.
    pub file: String,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the point file.
    pub bytes_written: u64,
    /// Blocks copied (all of them for a full backup).
    pub blocks_changed: u64,
    /// Blocks of the image.
    pub blocks_total: u32,
}

/// Appends the point just copied to the manifest, saves it, and reports the point: the same
/// record and report for a local backup and one pulled over NBD.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_point(
    dir: &Path,
    manifest: &mut Manifest,
    copied: Copied,
    image: String,
    image_size: u64,
    device: Option<&str>,
    cbt: Option<CbtMark>,
    started: Instant,
) -> Result<Report, CliError> {
    let Copied { kind, file, bytes_read, bytes_written, blocks_changed, blocks_total } = copied;
    let n = manifest.points.len() as u32;
    manifest.points.push(Point {
        n,
        kind: kind.into(),
        file: file.clone(),
        time: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        image: image.clone(),
        image_size,
        device: device.map(str::to_string),
        cbt,
        bytes_written,
        blocks_changed,
    });
    save_manifest(dir, manifest)?;
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { bytes_read as f64 / 1e6 / secs } else { 0.0 };
    Ok(Report::new(
        vec![
            format!("point={n}"),
            format!("kind={kind}"),
            format!("file={}", dir.join(&file).display()),
            format!("bytes_read={bytes_read}"),
            format!("bytes_written={bytes_written}"),
            format!("blocks_changed={blocks_changed}/{blocks_total}"),
            format!("seconds={secs:.3}"),
            format!("rate={rate:.1} MB/s"),
        ],
        json!({"point": n, "kind": kind, "file": dir.join(&file), "image": image,
               "image_size": image_size, "bytes_read": bytes_read,
               "bytes_written": bytes_written, "blocks_changed": blocks_changed,
               "blocks_total": blocks_total, "seconds": secs, "mb_per_s": rate}),
    ))
}

/// Starts the writeback of a point file while it is still being written, every
/// [`Writeback::STEP_BYTES`], so the final `fsync` finds little left to write and the disk works
/// while the image is read (a plain write-then-fsync leaves the disk idle during the copy and the
/// copy idle during the flush). Advisory: a failure here only means the `fsync` does the work.
struct Writeback<'a> {
    file: &'a File,
    started_bytes: u64,
}

impl<'a> Writeback<'a> {
    const STEP_BYTES: u64 = 8 << 20;

    fn new(file: &'a File) -> Writeback<'a> {
        Writeback { file, started_bytes: 0 }
    }

    /// Everything below `done_bytes` has been written.
    fn progress(&mut self, done_bytes: u64) {
        if done_bytes < self.started_bytes + Self::STEP_BYTES {
            return;
        }
        let (from, len) = (self.started_bytes, done_bytes - self.started_bytes);
        // SAFETY: sync_file_range on an open descriptor we own, plain integers; it reads no
        // memory of ours.
        unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(self.file),
                from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.started_bytes = done_bytes;
    }
}

/// Copies the whole image, leaving all-zero units as holes. Returns (read, written).
pub(crate) fn copy_full(
    src: &mut dyn Source,
    out_path: &Path,
    size: u64,
    pb: &ProgressBar,
) -> Result<(u64, u64), CliError> {
    let tmp = out_path.with_extension("tmp");
    let out = File::create(&tmp).map_err(io(tmp.display()))?;
    out.set_len(size).map_err(io(tmp.display()))?;
    let mut buf = vec![0u8; COPY_UNIT];
    let (mut off, mut written) = (0u64, 0u64);
    let mut writeback = Writeback::new(&out);
    while off < size {
        let n = (size - off).min(COPY_UNIT as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], off).map_err(io(tmp.display()))?;
            written += n as u64;
        }
        off += n as u64;
        writeback.progress(off);
        pb.set_position(off);
    }
    out.sync_all().map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, out_path).map_err(io(out_path.display()))?;
    Ok((size, written))
}

pub(crate) fn write_delta(
    src: &mut dyn Source,
    out_path: &Path,
    bs: u64,
    size: u64,
    blocks: &[u64],
    pb: &ProgressBar,
) -> Result<u64, CliError> {
    let tmp = out_path.with_extension("tmp");
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io(tmp.display()))?;
    let mut header = Vec::with_capacity(DELTA_HEADER as usize + blocks.len() * 8);
    header.extend_from_slice(DELTA_MAGIC);
    header.extend_from_slice(&FORMAT.to_le_bytes());
    header.extend_from_slice(&(bs as u32).to_le_bytes());
    header.extend_from_slice(&size.to_le_bytes());
    header.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
    for i in blocks {
        header.extend_from_slice(&i.to_le_bytes());
    }
    out.write_all_at(&header, 0).map_err(io(tmp.display()))?;
    let mut pos = header.len() as u64;
    let mut buf = vec![0u8; bs as usize];
    let mut written = 0u64;
    // Adjacent changed blocks are read and written together (up to COPY_UNIT).
    let mut i = 0;
    let mut writeback = Writeback::new(&out);
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len()
            && blocks[j] == blocks[j - 1] + 1
            && ((j - i + 1) as u64) * bs <= COPY_UNIT as u64
        {
            j += 1;
        }
        let start = blocks[i] * bs;
        let end = ((blocks[j - 1] + 1) * bs).min(size);
        let n = (end - start) as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        src.read_exact_at(&mut buf[..n], start)?;
        out.write_all_at(&buf[..n], pos).map_err(io(tmp.display()))?;
        pos += n as u64;
        written += n as u64;
        writeback.progress(pos);
        pb.inc(n as u64);
        i = j;
    }
    out.sync_all().map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, out_path).map_err(io(out_path.display()))?;
    Ok(written)
}

struct Delta {
    file: File,
    bs: u64,
    /// block → offset of its data in the file.
    blocks: std::collections::HashMap<u64, u64>,
}

fn open_delta(path: &Path, image_size: u64) -> Result<Delta, CliError> {
    let file = File::open(path).map_err(io(path.display()))?;
    let mut h = [0u8; DELTA_HEADER as usize];
    read_full(&file, &mut h, 0, path)?;
    let bad = |why: &str| CliError::new(libc::EPROTO, format!("{}: {why}", path.display()));
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if &h[..8] != DELTA_MAGIC || u32_at(8) != FORMAT {
        return Err(bad("not a delta file of this format"));
    }
    let bs = u64::from(u32_at(12));
    if bs == 0 || u64_at(16) != image_size {
        return Err(bad("block size or image size does not match the manifest"));
    }
    let count = u64_at(24);
    let file_len = file.metadata().map_err(io(path.display()))?.len();
    if count > file_len / 8 {
        return Err(bad("block count larger than the file"));
    }
    let mut idx = vec![0u8; count as usize * 8];
    read_full(&file, &mut idx, DELTA_HEADER, path)?;
    let mut blocks = std::collections::HashMap::with_capacity(count as usize);
    let mut pos = DELTA_HEADER + count * 8;
    for c in idx.chunks_exact(8) {
        let i = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        if i.checked_mul(bs).is_none_or(|s| s >= image_size) {
            return Err(bad("block index beyond the image"));
        }
        blocks.insert(i, pos);
        pos += bs.min(image_size - i * bs);
    }
    if pos != file_len {
        return Err(bad("file length does not match its index (truncated?)"));
    }
    Ok(Delta { file, bs, blocks })
}

/// A backup point, readable piecewise.
struct PointReader {
    full: File,
    full_path: PathBuf,
    deltas: Vec<(Delta, PathBuf)>,
    size: u64,
    unit: u64,
}

impl PointReader {
    fn open(dir: &Path, point: Option<u32>) -> Result<(PointReader, u32), CliError> {
        let m = load_manifest(dir)?;
        if m.points.is_empty() {
            return Err(CliError::new(
                libc::ENOENT,
                format!("{} holds no backup (no {MANIFEST})", dir.display()),
            ));
        }
        let n = point.unwrap_or(m.points.len() as u32 - 1);
        let Some(p) = m.points.get(n as usize) else {
            return Err(CliError::new(
                libc::ENOENT,
                format!("no point {n}: {} holds points 0 to {}", dir.display(), m.points.len() - 1),
            ));
        };
        let base = m.points[..=n as usize]
            .iter()
            .rposition(|p| p.kind == "full")
            .ok_or_else(|| CliError::new(libc::EPROTO, "no full point before this one"))?;
        let full_path = dir.join(&m.points[base].file);
        let full = File::open(&full_path).map_err(io(full_path.display()))?;
        let size = p.image_size;
        let mut deltas = Vec::new();
        for q in &m.points[base + 1..=n as usize] {
            let path = dir.join(&q.file);
            deltas.push((open_delta(&path, size)?, path));
        }
        let unit = deltas.first().map_or(COPY_UNIT as u64, |(d, _)| d.bs);
        if deltas.iter().any(|(d, _)| d.bs != unit) {
            return Err(CliError::new(libc::EPROTO, "deltas of one chain differ in block size"));
        }
        Ok((PointReader { full, full_path, deltas, size, unit }, n))
    }

    /// Fills `buf` with the point's bytes of unit `i`.
    fn unit(&self, i: u64, buf: &mut [u8]) -> Result<(), CliError> {
        let off = i * self.unit;
        for (d, path) in self.deltas.iter().rev() {
            if let Some(pos) = d.blocks.get(&i) {
                return read_full(&d.file, buf, *pos, path);
            }
        }
        read_full(&self.full, buf, off, &self.full_path)
    }

    fn units(&self) -> u64 {
        self.size.div_ceil(self.unit)
    }

    fn unit_len(&self, i: u64) -> usize {
        self.unit.min(self.size - i * self.unit) as usize
    }
}

/// `blksnap restore`.
pub fn restore(dir: &Path, point: Option<u32>, output: &Path) -> Result<Report, CliError> {
    let started = Instant::now();
    let (r, n) = PointReader::open(dir, point)?;
    let out = File::create(output).map_err(io(output.display()))?;
    out.set_len(r.size).map_err(io(output.display()))?;
    let mut buf = vec![0u8; r.unit as usize];
    let mut writeback = Writeback::new(&out);
    for i in 0..r.units() {
        let len = r.unit_len(i);
        r.unit(i, &mut buf[..len])?;
        if buf[..len].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..len], i * r.unit).map_err(io(output.display()))?;
        }
        writeback.progress(i * r.unit + len as u64);
    }
    out.sync_all().map_err(io(output.display()))?;
    let secs = started.elapsed().as_secs_f64();
    Ok(Report::new(
        vec![
            format!("point={n}"),
            format!("output={}", output.display()),
            format!("bytes={}", r.size),
        ],
        json!({"point": n, "output": output, "bytes": r.size, "seconds": secs}),
    ))
}

/// `blksnap verify`: exit status 1 if the point differs from the image.
pub fn verify(image: &Path, dir: &Path, point: Option<u32>) -> Result<Report, CliError> {
    let (r, n) = PointReader::open(dir, point)?;
    let img = File::open(image).map_err(io(format!("open the image {}", image.display())))?;
    let size = size_of(&img)?;
    if size != r.size {
        return Ok(Report {
            text: vec![
                format!("point={n}"),
                "result=differs".into(),
                format!("reason=size: image {size} bytes, backup {} bytes", r.size),
            ],
            json: json!({"point": n, "identical": false, "image_size": size,
                         "backup_size": r.size}),
            status: 1,
        });
    }
    let mut want = vec![0u8; r.unit as usize];
    let mut got = vec![0u8; r.unit as usize];
    let mut first = None;
    let mut differing = 0u64;
    for i in 0..r.units() {
        let len = r.unit_len(i);
        r.unit(i, &mut want[..len])?;
        read_full(&img, &mut got[..len], i * r.unit, image)?;
        if want[..len] != got[..len] {
            differing += 1;
            if first.is_none() {
                let k = want[..len].iter().zip(&got[..len]).position(|(a, b)| a != b);
                first = Some(i * r.unit + k.unwrap_or(0) as u64);
            }
        }
    }
    let ok = first.is_none();
    let mut text =
        vec![format!("point={n}"), format!("result={}", if ok { "identical" } else { "differs" })];
    if let Some(f) = first {
        text.push(format!("first_difference={f}"));
        text.push(format!("differing_units={differing} of {} bytes", r.unit));
    }
    Ok(Report {
        text,
        json: json!({"point": n, "identical": ok, "bytes": size, "first_difference": first,
                     "differing_units": differing, "unit": r.unit}),
        status: if ok { 0 } else { 1 },
    })
}
