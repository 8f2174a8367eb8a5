//! # blksnap-proto: the blksnapd control protocol
//!
//! Clients (the CLI, `libblksnap` in client mode, tests) talk to `blksnapd` over a Unix stream
//! socket (default [`DEFAULT_SOCKET`]). Every message is a **frame**: a 4-byte little-endian
//! length, then that many bytes of [postcard](https://docs.rs/postcard) encoding of a
//! [`RequestFrame`] (client → daemon) or a [`ResponseFrame`] (daemon → client). One request, one
//! response, in order; a connection may carry any number of them.
//!
//! Versioning: every frame carries [`PROTOCOL_VERSION`]. Message layouts never change within a
//! version; a new version only appends variants, so a daemon accepts every version from
//! [`MIN_PROTOCOL_VERSION`] to its own (version 2 appended [`Request::AddDevice`],
//! [`Request::RemoveDevice`] and [`Reply::Device`]; version 3 appended the data requests
//! [`Request::DevRead`], [`Request::DevWrite`], [`Request::DevDiscard`],
//! [`Request::DevWriteZeroes`], [`Request::DevFlush`] and [`Reply::Data`]; a request that names a
//! variant its frame's version does not have is refused).
//!
//! Data requests (v3) are for hosts where the daemon serves no block devices (`--frontend none`):
//! a client reads and writes an origin or an image by its device number over the socket, served
//! through the engine exactly as the ublk front end serves a block request (origin writes mark
//! the change map and copy-on-write; image reads see the snapshot). Offsets and lengths are
//! multiples of 512; one read or write carries at most [`MAX_DATA_BYTES`], one discard or
//! write-zeroes at most [`MAX_ZERO_BYTES`]. A daemon answers a request of a version outside that range
//! with [`WireError`] `{errno: EINVAL, message: "protocol version ..."}` and the version it speaks
//! in the response frame, then closes the connection.
//!
//! [`client::Client`] is a small blocking client (one request at a time on one connection).
//!
//! Validation: decoding checks the frame length (≤ [`MAX_FRAME_BYTES`]), that the whole payload
//! is consumed, and then every field ([`Request::validate`], [`ResponseFrame::validate`]): range
//! counts within the engine's limits, paths absolute, bounded and NUL-free, errno values known,
//! map lengths within bounds. The requests mirror the engine API one to one.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::{self, Read, Write};

use blksnap_model::limits::MAX_RANGES_PER_CALL;
use blksnap_model::{
    CbtInfo, DeviceId, Errno, Error, Event, EventKind, SectorRange, SnapshotInfo, StorageStats,
    Uuid,
};
use serde::{Deserialize, Serialize};

mod bytes;
pub mod client;

pub use bytes::Bytes;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest version a daemon of this crate still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Where the daemon listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/blksnap/control";
/// Largest frame payload either side accepts.
pub const MAX_FRAME_BYTES: u32 = 16 << 20;
/// Largest `cbtmap` length in one request (the reply must fit a frame).
pub const MAX_CBTMAP_LEN: u32 = 8 << 20;
/// Longest path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest error message sent.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Most devices a `ListDevices` reply may carry.
pub const MAX_LIST: usize = 65_536;
/// Largest read or write of one data request (v3), in bytes.
pub const MAX_DATA_BYTES: u32 = 1 << 20;
/// Largest discard or write-zeroes of one data request (v3), in bytes.
pub const MAX_ZERO_BYTES: u64 = 64 << 20;
/// Sector size: data requests' offsets and lengths are multiples of it.
pub const SECTOR_BYTES: u64 = 512;

/// A block device number (`MAJOR:MINOR`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dev {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl From<DeviceId> for Dev {
    fn from(d: DeviceId) -> Dev {
        Dev { major: d.major, minor: d.minor }
    }
}

impl From<Dev> for DeviceId {
    fn from(d: Dev) -> DeviceId {
        DeviceId::new(d.major, d.minor)
    }
}

/// A snapshot id or CBT generation (16 bytes).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Id(pub [u8; 16]);

impl From<Uuid> for Id {
    fn from(u: Uuid) -> Id {
        Id(u.0)
    }
}

impl From<Id> for Uuid {
    fn from(i: Id) -> Uuid {
        Uuid(i.0)
    }
}

/// A sector range `{offset, count}`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub offset: u64,
    /// Number of sectors.
    pub count: u64,
}

impl From<Range> for SectorRange {
    fn from(r: Range) -> SectorRange {
        SectorRange::new(r.offset, r.count)
    }
}

impl From<SectorRange> for Range {
    fn from(r: SectorRange) -> Range {
        Range { offset: r.offset, count: r.count }
    }
}

/// How a snapshot's difference storage is provided.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// v3: empty at create; the client appends ranges with [`Request::SnapshotAppend`].
    Ranges,
    /// newest: one regular file (grown by the daemon up to the limit) or block device, opened
    /// by the daemon.
    File {
        /// Absolute path of the file or block device.
        path: String,
        /// Growth limit in sectors.
        limit_sectors: u64,
    },
}

/// A request: one per engine operation, plus daemon queries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The daemon's protocol version and build.
    Version,
    /// Devices the daemon serves (origins and images).
    ListDevices,
    /// BLKFILTER_ATTACH.
    Attach {
        /// The tracked device.
        dev: Dev,
    },
    /// BLKFILTER_DETACH.
    Detach {
        /// The tracked device.
        dev: Dev,
    },
    /// ctl cbtinfo.
    CbtInfo {
        /// The tracked device.
        dev: Dev,
    },
    /// ctl cbtmap: `length` bytes of the read map from block `offset`.
    CbtMap {
        /// The tracked device.
        dev: Dev,
        /// First block.
        offset: u32,
        /// Number of blocks (≤ [`MAX_CBTMAP_LEN`]).
        length: u32,
    },
    /// ctl cbtdirty.
    CbtDirty {
        /// The tracked device.
        dev: Dev,
        /// Ranges to mark (≤ `MAX_RANGES_PER_CALL`).
        ranges: Vec<Range>,
    },
    /// SNAPSHOT_CREATE.
    SnapshotCreate {
        /// The difference storage.
        storage: Storage,
    },
    /// SNAPSHOT_DESTROY (removes the image devices, even open or mounted ones).
    SnapshotDestroy {
        /// The snapshot.
        id: Id,
    },
    /// SNAPSHOT_APPEND_STORAGE (v3): ranges of a file or block device opened by the daemon.
    SnapshotAppend {
        /// The snapshot.
        id: Id,
        /// Absolute path of the storage file or block device.
        path: String,
        /// Sector ranges of it (≤ `MAX_RANGES_PER_CALL`).
        ranges: Vec<Range>,
    },
    /// ctl snapshotadd.
    SnapshotAdd {
        /// The snapshot.
        id: Id,
        /// The tracked device.
        dev: Dev,
    },
    /// SNAPSHOT_TAKE (creates one image device per member).
    SnapshotTake {
        /// The snapshot.
        id: Id,
    },
    /// SNAPSHOT_COLLECT.
    SnapshotCollect,
    /// ctl snapshotinfo.
    SnapshotInfo {
        /// The tracked device.
        dev: Dev,
    },
    /// SNAPSHOT_WAIT_EVENT (blocks this connection up to `timeout_ms`).
    WaitEvent {
        /// The snapshot.
        id: Id,
        /// Timeout in milliseconds.
        timeout_ms: u32,
    },
    /// Difference storage accounting of a snapshot.
    StorageStats {
        /// The snapshot.
        id: Id,
    },
    /// (v2) Serve another tracked device in front of `backing` (a regular file or block device
    /// opened by the daemon); answered with [`Reply::Device`]. EALREADY if already served.
    AddDevice {
        /// Absolute path of the backing.
        backing: String,
        /// Attach the tracker at once.
        attach: bool,
    },
    /// (v2) Stop serving a tracked device and remove its block device (its tracker goes with
    /// it). EBUSY while it is in a snapshot; ENODEV if not served.
    RemoveDevice {
        /// The tracked device.
        dev: Dev,
    },
    /// (v3) Read `len_bytes` at `offset_bytes` of a served device: an origin (straight from
    /// its backing through the engine) or an image (the snapshot's content), named by its
    /// device number as [`Request::ListDevices`] lists it. Answered with [`Reply::Data`].
    DevRead {
        /// The served device (origin or image).
        dev: Dev,
        /// Byte offset (multiple of 512).
        offset_bytes: u64,
        /// Length (multiple of 512, ≤ [`MAX_DATA_BYTES`]).
        len_bytes: u32,
    },
    /// (v3) Write `data` at `offset_bytes`: an origin's write marks the change map and copies
    /// what a snapshot still needs first; an image's write goes to its difference storage.
    DevWrite {
        /// The served device (origin or image).
        dev: Dev,
        /// Byte offset (multiple of 512).
        offset_bytes: u64,
        /// The data (length a multiple of 512, ≤ [`MAX_DATA_BYTES`]).
        data: Bytes,
    },
    /// (v3) Discard a range (as the ublk front end: tracked and copied like a write).
    DevDiscard {
        /// The served device (origin or image).
        dev: Dev,
        /// Byte offset (multiple of 512).
        offset_bytes: u64,
        /// Length (multiple of 512, ≤ [`MAX_ZERO_BYTES`]).
        len_bytes: u64,
    },
    /// (v3) Write zeroes over a range.
    DevWriteZeroes {
        /// The served device (origin or image).
        dev: Dev,
        /// Byte offset (multiple of 512).
        offset_bytes: u64,
        /// Length (multiple of 512, ≤ [`MAX_ZERO_BYTES`]).
        len_bytes: u64,
    },
    /// (v3) Flush: the snapshot's difference storage, then (origins) the backing.
    DevFlush {
        /// The served device (origin or image).
        dev: Dev,
    },
}

/// Role of a device the daemon serves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A tracked device in front of its backing.
    Origin,
    /// The snapshot image of the origin `of`.
    Image {
        /// The origin whose image this is.
        of: Dev,
    },
}

/// One served device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The ublk block device's number (an origin's engine id).
    pub dev: Dev,
    /// Origin or image.
    pub role: Role,
    /// The block device node, e.g. `/dev/ublkb0`.
    pub path: String,
    /// The backing file or device (origins), empty for images.
    pub backing: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
}

/// cbtinfo's answer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbtInfoW {
    /// Capacity in bytes.
    pub device_capacity_bytes: u64,
    /// Block size in bytes.
    pub block_size_bytes: u32,
    /// Number of blocks.
    pub block_count: u32,
    /// Generation id.
    pub generation_id: Id,
    /// `snap_number_previous`.
    pub changes_number: u8,
}

impl From<CbtInfo> for CbtInfoW {
    fn from(c: CbtInfo) -> CbtInfoW {
        CbtInfoW {
            device_capacity_bytes: c.device_capacity_bytes,
            block_size_bytes: c.block_size_bytes,
            block_count: c.block_count,
            generation_id: c.generation_id.into(),
            changes_number: c.changes_number,
        }
    }
}

impl From<CbtInfoW> for CbtInfo {
    fn from(c: CbtInfoW) -> CbtInfo {
        CbtInfo {
            device_capacity_bytes: c.device_capacity_bytes,
            block_size_bytes: c.block_size_bytes,
            block_count: c.block_count,
            generation_id: c.generation_id.into(),
            changes_number: c.changes_number,
        }
    }
}

/// An event's payload.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKindW {
    /// v3 low free space.
    LowFreeSpace {
        /// Sectors to append.
        requested_sectors: u64,
    },
    /// A device's diff area failed.
    Corrupted {
        /// The original device.
        device: Dev,
        /// Positive errno.
        errno: i32,
    },
    /// newest: storage at its limit.
    NoSpace {
        /// Total requested sectors.
        requested_sectors: u64,
    },
}

/// A snapshot event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventW {
    /// Clock reading at generation, ns.
    pub time_ns: u64,
    /// Payload.
    pub kind: EventKindW,
}

impl From<Event> for EventW {
    fn from(e: Event) -> EventW {
        let kind = match e.kind {
            EventKind::LowFreeSpace { requested_sectors } => {
                EventKindW::LowFreeSpace { requested_sectors }
            }
            EventKind::Corrupted { device, errno } => {
                EventKindW::Corrupted { device: device.into(), errno: errno.code() }
            }
            EventKind::NoSpace { requested_sectors } => EventKindW::NoSpace { requested_sectors },
        };
        EventW { time_ns: e.time_ns, kind }
    }
}

impl TryFrom<EventW> for Event {
    type Error = Error;
    fn try_from(e: EventW) -> Result<Event, Error> {
        let kind = match e.kind {
            EventKindW::LowFreeSpace { requested_sectors } => {
                EventKind::LowFreeSpace { requested_sectors }
            }
            EventKindW::Corrupted { device, errno } => {
                EventKind::Corrupted { device: device.into(), errno: known_errno(errno)? }
            }
            EventKindW::NoSpace { requested_sectors } => EventKind::NoSpace { requested_sectors },
        };
        Ok(Event { time_ns: e.time_ns, kind })
    }
}

/// Storage accounting.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsW {
    /// Sectors the storage has.
    pub capacity_sectors: u64,
    /// Sectors handed out.
    pub filled_sectors: u64,
    /// Sectors asked for.
    pub requested_sectors: u64,
    /// Ran out (permanent).
    pub overflow: bool,
    /// Low-space flag.
    pub low_space: bool,
}

impl From<StorageStats> for StatsW {
    fn from(s: StorageStats) -> StatsW {
        StatsW {
            capacity_sectors: s.capacity_sectors,
            filled_sectors: s.filled_sectors,
            requested_sectors: s.requested_sectors,
            overflow: s.overflow,
            low_space: s.low_space,
        }
    }
}

/// A successful answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The request was carried out; nothing to return.
    Done,
    /// Answer to [`Request::Version`].
    Version {
        /// Protocol version.
        protocol: u32,
        /// Daemon name and version.
        daemon: String,
    },
    /// Answer to [`Request::ListDevices`].
    Devices(Vec<DeviceEntry>),
    /// Answer to [`Request::CbtInfo`].
    CbtInfo(CbtInfoW),
    /// Answer to [`Request::CbtMap`]: exactly the requested length.
    CbtMap(Vec<u8>),
    /// Answer to [`Request::SnapshotCreate`].
    Created(Id),
    /// Answer to [`Request::SnapshotCollect`].
    Snapshots(Vec<Id>),
    /// Answer to [`Request::SnapshotInfo`].
    SnapshotInfo {
        /// 0 or the negative errno of the diff area's failure.
        error_code: i32,
        /// The origin whose image exists.
        image: Option<Dev>,
        /// The image's block device node, when it exists.
        image_path: Option<String>,
    },
    /// Answer to [`Request::WaitEvent`].
    Event(EventW),
    /// Answer to [`Request::StorageStats`].
    Stats(StatsW),
    /// (v2) Answer to [`Request::AddDevice`].
    Device(DeviceEntry),
    /// (v3) Answer to [`Request::DevRead`]: exactly the requested length.
    Data(Bytes),
}

/// A failed request: the errno the engine (or the daemon) returned and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    /// Positive Linux errno, one of the engine's closed set.
    pub errno: i32,
    /// Human-readable detail (≤ [`MAX_MESSAGE_BYTES`]).
    pub message: String,
}

impl WireError {
    /// From an engine error.
    pub fn from_error(e: &Error) -> WireError {
        WireError { errno: e.errno.code(), message: e.detail.to_string() }
    }

    /// From an errno and a message (truncated to the limit).
    pub fn new(errno: Errno, message: impl Into<String>) -> WireError {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_MESSAGE_BYTES);
        WireError { errno: errno.code(), message }
    }

    /// The errno, if known.
    pub fn errno(&self) -> Option<Errno> {
        Errno::from_code(self.errno)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.errno().map_or("E?", |e| e.name());
        write!(f, "{name} ({}): {}", self.errno, self.message)
    }
}

impl std::error::Error for WireError {}

/// Client → daemon.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RequestFrame {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The request.
    pub request: Request,
}

/// Daemon → client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ResponseFrame {
    /// [`PROTOCOL_VERSION`] of the daemon.
    pub version: u32,
    /// The outcome.
    pub result: Result<Reply, WireError>,
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

fn invalid(detail: &'static str) -> Error {
    Error::new(Errno::EINVAL, detail)
}

fn known_errno(code: i32) -> Result<Errno, Error> {
    Errno::from_code(code).ok_or(invalid("unknown errno value"))
}

fn check_path(path: &str) -> Result<(), Error> {
    if path.is_empty() || !path.starts_with('/') {
        return Err(invalid("path must be absolute"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid("path too long"));
    }
    if path.contains('\0') {
        return Err(invalid("path contains NUL"));
    }
    Ok(())
}

fn check_ranges(ranges: &[Range]) -> Result<(), Error> {
    if ranges.len() > MAX_RANGES_PER_CALL {
        return Err(invalid("too many ranges in one request"));
    }
    if ranges.iter().any(|r| r.offset.checked_add(r.count).is_none()) {
        return Err(invalid("range overflows"));
    }
    Ok(())
}

/// A data request's range: sector-aligned, within the per-request limit, not wrapping.
fn check_data_range(offset: u64, len: u64, max: u64) -> Result<(), Error> {
    if !offset.is_multiple_of(SECTOR_BYTES) || !len.is_multiple_of(SECTOR_BYTES) {
        return Err(invalid("offset and length must be multiples of 512"));
    }
    if len > max {
        return Err(invalid("data request longer than the per-request limit"));
    }
    if offset.checked_add(len).is_none() {
        return Err(invalid("range overflows"));
    }
    Ok(())
}

fn check_entry(d: &DeviceEntry) -> Result<(), Error> {
    check_path(&d.path)?;
    if !d.backing.is_empty() {
        check_path(&d.backing)?;
    }
    Ok(())
}

impl Request {
    /// The first protocol version that has this request.
    pub fn since_version(&self) -> u32 {
        match self {
            Request::AddDevice { .. } | Request::RemoveDevice { .. } => 2,
            Request::DevRead { .. }
            | Request::DevWrite { .. }
            | Request::DevDiscard { .. }
            | Request::DevWriteZeroes { .. }
            | Request::DevFlush { .. } => 3,
            _ => 1,
        }
    }

    /// Checks every field; the daemon refuses invalid requests with EINVAL before any work.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Request::CbtMap { length, .. } if *length > MAX_CBTMAP_LEN => {
                Err(invalid("cbtmap length over the per-request limit"))
            }
            Request::CbtDirty { ranges, .. } => check_ranges(ranges),
            Request::SnapshotCreate { storage: Storage::File { path, limit_sectors } } => {
                check_path(path)?;
                if *limit_sectors == 0 {
                    return Err(invalid("storage limit must be positive"));
                }
                Ok(())
            }
            Request::SnapshotAppend { path, ranges, .. } => {
                check_path(path)?;
                check_ranges(ranges)
            }
            Request::AddDevice { backing, .. } => check_path(backing),
            Request::DevRead { offset_bytes, len_bytes, .. } => {
                check_data_range(*offset_bytes, u64::from(*len_bytes), u64::from(MAX_DATA_BYTES))
            }
            Request::DevWrite { offset_bytes, data, .. } => {
                check_data_range(*offset_bytes, data.0.len() as u64, u64::from(MAX_DATA_BYTES))
            }
            Request::DevDiscard { offset_bytes, len_bytes, .. }
            | Request::DevWriteZeroes { offset_bytes, len_bytes, .. } => {
                check_data_range(*offset_bytes, *len_bytes, MAX_ZERO_BYTES)
            }
            _ => Ok(()),
        }
    }
}

impl ResponseFrame {
    /// Checks every field of a daemon's answer.
    pub fn validate(&self) -> Result<(), Error> {
        match &self.result {
            Err(e) => {
                known_errno(e.errno)?;
                if e.message.len() > MAX_MESSAGE_BYTES {
                    return Err(invalid("error message too long"));
                }
            }
            Ok(Reply::Devices(list)) => {
                if list.len() > MAX_LIST {
                    return Err(invalid("device list too long"));
                }
                for d in list {
                    check_entry(d)?;
                }
            }
            Ok(Reply::Device(d)) => check_entry(d)?,
            Ok(Reply::Data(data)) if data.0.len() > MAX_DATA_BYTES as usize => {
                return Err(invalid("data reply too long"));
            }
            Ok(Reply::CbtMap(map)) if map.len() > MAX_CBTMAP_LEN as usize => {
                return Err(invalid("cbtmap reply too long"));
            }
            Ok(Reply::Snapshots(ids)) if ids.len() > blksnap_model::limits::MAX_SNAPSHOTS => {
                return Err(invalid("too many snapshot ids"));
            }
            Ok(Reply::SnapshotInfo { error_code, image_path, .. }) => {
                if *error_code > 0 || (*error_code < 0 && known_errno(-error_code).is_err()) {
                    return Err(invalid("snapshot error code out of range"));
                }
                if let Some(p) = image_path {
                    check_path(p)?;
                }
            }
            Ok(Reply::Event(e)) => {
                Event::try_from(*e)?;
            }
            Ok(Reply::Version { daemon, .. }) if daemon.len() > MAX_MESSAGE_BYTES => {
                return Err(invalid("daemon name too long"));
            }
            Ok(_) => {}
        }
        Ok(())
    }
}

/// Converts a reply's snapshot info to the model's.
pub fn snapshot_info(error_code: i32, image: Option<Dev>) -> SnapshotInfo {
    SnapshotInfo { error_code, image: image.map(Into::into) }
}

/// A postcard output that appends to a vector sized beforehand (runs of bytes are one copy).
struct FrameBuf(Vec<u8>);

impl postcard::ser_flavors::Flavor for FrameBuf {
    type Output = Vec<u8>;
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Encodes a message as one frame (length prefix + postcard).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    // Sized first, then written once into a buffer of exactly that size: a 1 MiB data reply
    // costs one copy, not a growing vector's reallocations plus a copy behind the length.
    let len = postcard::experimental::serialized_size(msg)
        .map_err(|_| invalid("cannot encode message"))?;
    if len > MAX_FRAME_BYTES as usize {
        return Err(Error::new(Errno::EFBIG, "message larger than a frame"));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let out = postcard::serialize_with_flavor(msg, FrameBuf(out))
        .map_err(|_| invalid("cannot encode message"))?;
    debug_assert_eq!(out.len(), 4 + len);
    Ok(out)
}

/// Decodes a frame payload: the whole payload must be one message.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|_| invalid("malformed message"))?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the message"));
    }
    Ok(msg)
}

/// Whether a daemon of this crate serves requests of `version`.
pub fn version_supported(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// Decodes and validates a request frame payload (of a supported version: a request the
/// frame's version does not have is EINVAL).
pub fn decode_request(body: &[u8]) -> Result<RequestFrame, Error> {
    let frame: RequestFrame = decode(body)?;
    if version_supported(frame.version) {
        if frame.request.since_version() > frame.version {
            return Err(invalid("request not in the frame's protocol version"));
        }
        frame.request.validate()?;
    }
    Ok(frame)
}

/// Decodes and validates a response frame payload.
pub fn decode_response(body: &[u8]) -> Result<ResponseFrame, Error> {
    let frame: ResponseFrame = decode(body)?;
    frame.validate()?;
    Ok(frame)
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let bytes = encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.detail))?;
    w.write_all(&bytes)?;
    w.flush()
}

/// Reads one frame's payload; `Ok(None)` at a clean end of stream (before a length).
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_request(req: Request) {
        let frame = RequestFrame { version: PROTOCOL_VERSION, request: req };
        let bytes = encode(&frame).unwrap();
        let body = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(decode_request(&body).unwrap(), frame);
    }

    #[test]
    fn requests_round_trip() {
        let dev = Dev { major: 259, minor: 3 };
        let id = Id([7; 16]);
        for req in [
            Request::Version,
            Request::ListDevices,
            Request::Attach { dev },
            Request::Detach { dev },
            Request::CbtInfo { dev },
            Request::CbtMap { dev, offset: 1, length: 100 },
            Request::CbtDirty { dev, ranges: vec![Range { offset: 8, count: 16 }] },
            Request::SnapshotCreate { storage: Storage::Ranges },
            Request::SnapshotCreate {
                storage: Storage::File { path: "/tmp/diff".into(), limit_sectors: 1 << 20 },
            },
            Request::SnapshotDestroy { id },
            Request::SnapshotAppend {
                id,
                path: "/dev/sdb".into(),
                ranges: vec![Range { offset: 0, count: 2048 }],
            },
            Request::SnapshotAdd { id, dev },
            Request::SnapshotTake { id },
            Request::SnapshotCollect,
            Request::SnapshotInfo { dev },
            Request::WaitEvent { id, timeout_ms: 10 },
            Request::StorageStats { id },
            Request::AddDevice { backing: "/tmp/disk.img".into(), attach: true },
            Request::RemoveDevice { dev },
            Request::DevRead { dev, offset_bytes: 4096, len_bytes: MAX_DATA_BYTES },
            Request::DevWrite { dev, offset_bytes: 512, data: Bytes(vec![7; 1024]) },
            Request::DevDiscard { dev, offset_bytes: 0, len_bytes: MAX_ZERO_BYTES },
            Request::DevWriteZeroes { dev, offset_bytes: 1 << 30, len_bytes: 512 },
            Request::DevFlush { dev },
        ] {
            round_trip_request(req);
        }
    }

    #[test]
    fn versions() {
        // v1 frames decode with the v1 variants (indices unchanged by the appended ones)...
        let v1 = RequestFrame { version: 1, request: Request::SnapshotCollect };
        let bytes = encode(&v1).unwrap();
        assert_eq!(decode_request(&bytes[4..]).unwrap(), v1);
        // ...but may not use a v2 request
        let v1_add = RequestFrame {
            version: 1,
            request: Request::RemoveDevice { dev: Dev { major: 1, minor: 2 } },
        };
        let bytes = encode(&v1_add).unwrap();
        assert_eq!(decode_request(&bytes[4..]).unwrap_err().errno, Errno::EINVAL);
        assert!(version_supported(1) && version_supported(2) && version_supported(3));
        assert!(!version_supported(0) && !version_supported(4));
        // a v2 frame may not carry a v3 data request
        let v2_read = RequestFrame {
            version: 2,
            request: Request::DevFlush { dev: Dev { major: 240, minor: 0 } },
        };
        let bytes = encode(&v2_read).unwrap();
        assert_eq!(decode_request(&bytes[4..]).unwrap_err().errno, Errno::EINVAL);
        let bad = RequestFrame {
            version: PROTOCOL_VERSION,
            request: Request::AddDevice { backing: "relative".into(), attach: false },
        };
        let bytes = encode(&bad).unwrap();
        assert_eq!(decode_request(&bytes[4..]).unwrap_err().errno, Errno::EINVAL);
    }

    #[test]
    fn responses_round_trip_and_validate() {
        let ev = Event {
            time_ns: 5,
            kind: EventKind::Corrupted { device: DeviceId::new(1, 2), errno: Errno::ENOSPC },
        };
        for result in [
            Ok(Reply::Done),
            Ok(Reply::Event(ev.into())),
            Ok(Reply::CbtMap(vec![1, 2, 3])),
            Ok(Reply::Data(Bytes(vec![9; 4096]))),
            Ok(Reply::SnapshotInfo {
                error_code: -28,
                image: Some(Dev { major: 1, minor: 2 }),
                image_path: Some("/dev/ublkb1".into()),
            }),
            Err(WireError::new(Errno::ESRCH, "no such snapshot")),
        ] {
            let frame = ResponseFrame { version: PROTOCOL_VERSION, result };
            let bytes = encode(&frame).unwrap();
            assert_eq!(decode_response(&bytes[4..]).unwrap(), frame);
        }
        assert_eq!(Event::try_from(EventW::from(ev)).unwrap(), ev);
    }

    #[test]
    fn invalid_fields_are_refused() {
        let dev = Dev { major: 1, minor: 1 };
        let too_many = vec![Range { offset: 0, count: 1 }; MAX_RANGES_PER_CALL + 1];
        for req in [
            Request::CbtMap { dev, offset: 0, length: MAX_CBTMAP_LEN + 1 },
            Request::CbtDirty { dev, ranges: too_many },
            Request::CbtDirty { dev, ranges: vec![Range { offset: u64::MAX, count: 1 }] },
            Request::SnapshotCreate {
                storage: Storage::File { path: "relative".into(), limit_sectors: 8 },
            },
            Request::SnapshotCreate {
                storage: Storage::File { path: "/a\0b".into(), limit_sectors: 8 },
            },
            Request::SnapshotCreate {
                storage: Storage::File { path: "/tmp/x".into(), limit_sectors: 0 },
            },
            Request::SnapshotAppend { id: Id([0; 16]), path: "/".repeat(5000), ranges: vec![] },
            Request::DevRead { dev, offset_bytes: 0, len_bytes: MAX_DATA_BYTES + 512 },
            Request::DevRead { dev, offset_bytes: 1, len_bytes: 512 },
            Request::DevRead { dev, offset_bytes: 0, len_bytes: 100 },
            Request::DevWrite { dev, offset_bytes: 0, data: Bytes(vec![0; 513]) },
            Request::DevWrite {
                dev,
                offset_bytes: 0,
                data: Bytes(vec![0; MAX_DATA_BYTES as usize + 512]),
            },
            Request::DevDiscard { dev, offset_bytes: 0, len_bytes: MAX_ZERO_BYTES + 512 },
            Request::DevWriteZeroes { dev, offset_bytes: u64::MAX - 511, len_bytes: 1024 },
        ] {
            let frame = RequestFrame { version: PROTOCOL_VERSION, request: req };
            let bytes = encode(&frame).unwrap();
            assert_eq!(decode_request(&bytes[4..]).unwrap_err().errno, Errno::EINVAL);
        }
        let bad = ResponseFrame {
            version: PROTOCOL_VERSION,
            result: Err(WireError { errno: 9999, message: String::new() }),
        };
        let bytes = encode(&bad).unwrap();
        assert!(decode_response(&bytes[4..]).is_err());
    }

    #[test]
    fn malformed_frames_are_refused() {
        // truncated, trailing garbage, oversize length
        let frame = RequestFrame { version: PROTOCOL_VERSION, request: Request::SnapshotCollect };
        let bytes = encode(&frame).unwrap();
        let mut trailing = bytes[4..].to_vec();
        trailing.push(0);
        assert!(decode_request(&trailing).is_err());
        assert!(decode_request(&[0xff, 0xff, 0xff]).is_err());
        let mut huge = (MAX_FRAME_BYTES + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(read_frame(&mut &huge[..]).is_err());
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        assert!(read_frame(&mut &[1, 0][..]).is_err());
        // arbitrary bytes never panic
        let mut x = 0x1234_5678_u32;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode_request(&junk);
            let _ = decode_response(&junk);
        }
    }
}
