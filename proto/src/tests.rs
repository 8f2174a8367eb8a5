//! Round trips, versions and validation of the frames.
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
        Request::SnapshotCreateFd { limit_sectors: 8 },
        Request::SnapshotAppendFd { id, ranges: vec![Range { offset: 0, count: 8 }] },
        Request::AddDeviceFd { attach: false },
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
    // ...nor a v3 descriptor-passing request
    let v2_fd = RequestFrame { version: 2, request: Request::AddDeviceFd { attach: true } };
    let bytes = encode(&v2_fd).unwrap();
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
        Request::SnapshotCreateFd { limit_sectors: 0 },
        Request::SnapshotAppendFd {
            id: Id([0; 16]),
            ranges: vec![Range { offset: u64::MAX, count: 2 }],
        },
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
