//! Protocol v3 data requests end to end on any host: a daemon with the null front end (no block
//! devices) serves origin and image data over its socket through the engine — change tracking
//! and copy-on-write as the ublk front end does — to several connections (processes) at once.

mod common;

use blksnap_proto::{Bytes, Dev, Reply, Request, RequestFrame, Role, Storage, MAX_DATA_BYTES};
use blksnap_service::Client;

const ENOENT: i32 = 2;
const EIO: i32 = 5;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
const DISK_BYTES: u64 = 8 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    dev: Dev,
    backing: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let socket = dir.join("run/control");
    let daemon = common::serve_null(&socket, &dir);
    let backing = dir.join("disk.img");
    let content: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512 % 251) as u8).collect();
    std::fs::write(&backing, &content).unwrap();
    let dev = daemon.add_origin(&backing, false).unwrap().into();
    Fixture { _dir: tmp, dir, socket, dev, backing }
}

fn read(c: &mut Client, dev: Dev, offset_bytes: u64, len_bytes: u32) -> Result<Vec<u8>, i32> {
    match c.call(Request::DevRead { dev, offset_bytes, len_bytes }).unwrap() {
        Ok(Reply::Data(Bytes(data))) => Ok(data),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => Err(e.errno),
    }
}

fn write(c: &mut Client, dev: Dev, offset_bytes: u64, data: Vec<u8>) -> Result<(), i32> {
    match c.call(Request::DevWrite { dev, offset_bytes, data: Bytes(data) }).unwrap() {
        Ok(Reply::Done) => Ok(()),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => Err(e.errno),
    }
}

fn errno(c: &mut Client, req: Request) -> i32 {
    c.call(req).unwrap().unwrap_err().errno
}

#[test]
fn origin_and_image_data_over_the_socket() {
    let f = fixture();
    let dev = f.dev;
    // Two connections, as two processes would use.
    let mut a = Client::connect(&f.socket).unwrap();
    let mut b = Client::connect(&f.socket).unwrap();
    let before = std::fs::read(&f.backing).unwrap();

    // Not attached yet: plain reads and writes of the backing through the engine.
    assert_eq!(read(&mut a, dev, 0, 4096).unwrap(), &before[..4096]);
    a.req(Request::Attach { dev }).unwrap();
    write(&mut a, dev, 0, vec![0xaa; 4096]).unwrap();
    assert_eq!(read(&mut b, dev, 0, 4096).unwrap(), vec![0xaa; 4096], "one engine");
    let mut pre_take = before.clone();
    pre_take[..4096].fill(0xaa);

    // Whole-device read in the largest requests, as `dd bs=1M` does.
    let mut whole = Vec::new();
    for at in (0..DISK_BYTES).step_by(MAX_DATA_BYTES as usize) {
        whole.extend(read(&mut b, dev, at, MAX_DATA_BYTES).unwrap());
    }
    assert_eq!(whole, pre_take);

    // Snapshot on a file storage; the image is served under its own number.
    let storage = f.dir.join("diff.img");
    std::fs::File::create(&storage).unwrap().set_len(4 << 20).unwrap();
    let Reply::Created(id) = a
        .req(Request::SnapshotCreate {
            storage: Storage::File { path: storage.display().to_string(), limit_sectors: 8192 },
        })
        .unwrap()
    else {
        panic!()
    };
    a.req(Request::SnapshotAdd { id, dev }).unwrap();
    a.req(Request::SnapshotTake { id }).unwrap();
    let Reply::Devices(list) = b.req(Request::ListDevices).unwrap() else { panic!() };
    let image = list.iter().find(|d| d.role == Role::Image { of: dev }).unwrap();
    assert_ne!(image.dev, dev);
    assert_eq!(image.capacity_bytes, DISK_BYTES);
    let img = image.dev;

    // Origin writes after the take from the other connection: copy-on-write keeps the image.
    write(&mut b, dev, 1 << 20, vec![0x55; 64 << 10]).unwrap();
    a.req(Request::DevDiscard { dev, offset_bytes: 2 << 20, len_bytes: 8192 }).unwrap();
    a.req(Request::DevWriteZeroes { dev, offset_bytes: 3 << 20, len_bytes: 4096 }).unwrap();
    a.req(Request::DevFlush { dev }).unwrap();
    assert_eq!(read(&mut a, dev, 1 << 20, 4096).unwrap(), vec![0x55; 4096]);
    assert_eq!(read(&mut a, dev, 2 << 20, 8192).unwrap(), vec![0; 8192]);
    assert_eq!(read(&mut a, dev, 3 << 20, 4096).unwrap(), vec![0; 4096]);
    let mut image_bytes = Vec::new();
    for at in (0..DISK_BYTES).step_by(MAX_DATA_BYTES as usize) {
        image_bytes.extend(read(&mut a, img, at, MAX_DATA_BYTES).unwrap());
    }
    assert!(image_bytes == pre_take, "the image is the device as it was at the take");
    let on_disk = std::fs::read(&f.backing).unwrap();
    assert_eq!(&on_disk[1 << 20..(1 << 20) + 4096], &[0x55; 4096][..], "reached the backing");

    // Image writes go to the difference storage; the origin is untouched.
    write(&mut b, img, 0, vec![0x11; 512]).unwrap();
    b.req(Request::DevWriteZeroes { dev: img, offset_bytes: 512, len_bytes: 512 }).unwrap();
    b.req(Request::DevFlush { dev: img }).unwrap();
    assert_eq!(read(&mut a, img, 0, 1024).unwrap(), [vec![0x11; 512], vec![0; 512]].concat());
    assert_eq!(read(&mut a, dev, 0, 512).unwrap(), vec![0xaa; 512]);

    // The change map: block 0 written between attach and take is in the map of the take.
    let Reply::CbtInfo(info) = b.req(Request::CbtInfo { dev }).unwrap() else { panic!() };
    let Reply::CbtMap(map) =
        b.req(Request::CbtMap { dev, offset: 0, length: info.block_count }).unwrap()
    else {
        panic!()
    };
    assert_ne!(map[0], 0, "block 0 written before the take");
    assert_eq!(map[map.len() - 1], 0, "the last block was never written");

    // Errors: past the end, unknown numbers, an image whose snapshot is gone.
    assert_eq!(
        errno(&mut a, Request::DevRead { dev, offset_bytes: DISK_BYTES, len_bytes: 512 }),
        EINVAL
    );
    assert_eq!(
        errno(
            &mut a,
            Request::DevWrite { dev, offset_bytes: DISK_BYTES - 512, data: Bytes(vec![0; 1024]) }
        ),
        EINVAL
    );
    let nobody = Dev { major: 7, minor: 7 };
    assert_eq!(
        errno(&mut a, Request::DevRead { dev: nobody, offset_bytes: 0, len_bytes: 512 }),
        ENODEV
    );
    assert_eq!(errno(&mut a, Request::DevFlush { dev: nobody }), ENODEV);
    a.req(Request::SnapshotDestroy { id }).unwrap();
    assert_eq!(
        errno(&mut a, Request::DevRead { dev: img, offset_bytes: 0, len_bytes: 512 }),
        ENODEV
    );
    a.req(Request::Detach { dev }).unwrap();
    assert_eq!(errno(&mut a, Request::CbtInfo { dev }), ENOENT);
    // Not tracked any more: still served, plain data.
    assert_eq!(read(&mut a, dev, 0, 512).unwrap(), vec![0xaa; 512]);
}

#[test]
fn corrupted_image_reads_fail_with_eio() {
    let f = fixture();
    let dev = f.dev;
    let mut c = Client::connect(&f.socket).unwrap();
    c.req(Request::Attach { dev }).unwrap();
    // A storage too small for what is written after the take: the snapshot overflows.
    let storage = f.dir.join("tiny.img");
    std::fs::File::create(&storage).unwrap().set_len(1 << 20).unwrap();
    let Reply::Created(id) = c
        .req(Request::SnapshotCreate {
            storage: Storage::File { path: storage.display().to_string(), limit_sectors: 2048 },
        })
        .unwrap()
    else {
        panic!()
    };
    c.req(Request::SnapshotAdd { id, dev }).unwrap();
    c.req(Request::SnapshotTake { id }).unwrap();
    let Reply::Devices(list) = c.req(Request::ListDevices).unwrap() else { panic!() };
    let img = list.iter().find(|d| d.role == Role::Image { of: dev }).unwrap().dev;
    for at in (0..DISK_BYTES).step_by(MAX_DATA_BYTES as usize) {
        // the origin write succeeds whatever happens to the snapshot
        write(&mut c, dev, at, vec![0x77; MAX_DATA_BYTES as usize]).unwrap();
    }
    let Reply::SnapshotInfo { error_code, .. } = c.req(Request::SnapshotInfo { dev }).unwrap()
    else {
        panic!()
    };
    assert!(error_code < 0, "overflowed: {error_code}");
    assert_eq!(errno(&mut c, Request::DevRead { dev: img, offset_bytes: 0, len_bytes: 512 }), EIO);
}

#[test]
fn data_requests_need_protocol_v3() {
    let f = fixture();
    let mut s = std::os::unix::net::UnixStream::connect(&f.socket).unwrap();
    let frame = RequestFrame { version: 2, request: Request::DevFlush { dev: f.dev } };
    blksnap_proto::write_frame(&mut s, &frame).unwrap();
    let body = blksnap_proto::read_frame(&mut s).unwrap().unwrap();
    let resp = blksnap_proto::decode_response(&body).unwrap();
    assert_eq!(resp.result.unwrap_err().errno, EINVAL);
}
