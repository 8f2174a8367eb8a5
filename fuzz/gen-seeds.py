#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/corpus/<target>/<name>).

Each seed is a representative input written with the byte encoding the target decodes (see
fuzz/src/lib.rs: every field is read from single bytes, little-endian for wider integers), so
the fuzzer starts from deep states: snapshots taken, storage appended, images read and written,
CBT marked, events waited for. control_protocol seeds are real protocol frames (4-byte LE length
+ postcard). Run from anywhere: python3 fuzz/gen-seeds.py
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


def u16(v):
    return list(struct.pack("<H", v))


def u32(v):
    return list(struct.pack("<I", v))


def u64(v):
    return list(struct.pack("<Q", v))


# ---- ops_vs_model (fuzz/src/lib.rs: ops_input, op) ---------------------------------------------
def header(disks, params=0, seed=1):
    out = [len(disks) - 1]
    for size_idx, io_min_idx in disks:
        out += [size_idx, io_min_idx]
    return out + [params, seed]


ATTACH = lambda d: [0, d]
CBT_MAP = lambda d, o, l: [3, d, o, l]
CBT_DIRTY = lambda d, o, c: [4, d, 1, o, c]
CREATE_RANGES = [5, 0]
CREATE_FILE = lambda init_idx, limit_idx: [5, 1, init_idx, limit_idx]
DESTROY = lambda s: [6, s]
APPEND = lambda s, b, o, c: [7, s, b, 1, o, c]
ADD = lambda s, d: [8, s, d]
TAKE = lambda s: [9, s]
COLLECT = [10]
INFO = lambda d: [11, d]
WAIT = lambda s: [12, s, 0]
READ = lambda d, s, n: [13, d, s, n]
WRITE = lambda d, s, n, seed: [14, d, s, n, seed]
DISCARD = lambda d, s, n: [16, d, s, n]
IMAGE_READ = lambda d, s, n: [18, d, s, n]
IMAGE_WRITE = lambda d, s, n, seed: [19, d, s, n, seed]
STORAGE_FAULT = [20, 3, 1, 0]  # next storage write fails with EIO
ORIGIN_READ_FAULT = lambda d: [20, d, 0, 0]
TORN = lambda d, n: [21, d, n, 0]
FAIL_GROWTH = [22, 0, 0]
ADVANCE = [23, 2]


def ops_seeds():
    # v3: two disks (64 and 75 sectors), ranges storage appended, take, I/O on both sides.
    v3 = header([(0, 0), (1, 0)]) + ATTACH(0) + ATTACH(1) + CREATE_RANGES + WAIT(0)
    v3 += APPEND(0, 0, 0, 200) + ADD(0, 0) + ADD(0, 1) + TAKE(0)
    v3 += WRITE(0, 3, 9, 7) + WRITE(1, 70, 5, 9) + IMAGE_READ(0, 0, 16) + IMAGE_WRITE(1, 8, 8, 3)
    v3 += IMAGE_READ(1, 0, 32) + CBT_MAP(0, 0, 16) + INFO(0) + COLLECT + DESTROY(0)
    write("ops_vs_model", "v3-ranges-take-io", v3)
    # newest: growable file storage, take, writes until it grows, a storage fault corrupts.
    new = header([(2, 0)], params=1) + ATTACH(0) + CREATE_FILE(1, 4) + ADD(0, 0) + TAKE(0)
    for s in range(0, 120, 16):
        new += WRITE(0, s, 8, s)
    new += STORAGE_FAULT + WRITE(0, 127, 4, 1) + WAIT(0) + IMAGE_READ(0, 0, 8) + INFO(0)
    write("ops_vs_model", "newest-file-grow-corrupt", new)
    # CBT: dirty ranges, take twice (switch), map, detach while a member (EBUSY).
    cbt = header([(4, 0), (7, 1)], params=2) + ATTACH(0) + ATTACH(1) + CBT_DIRTY(0, 0, 5)
    cbt += CREATE_FILE(5, 5) + ADD(0, 0) + [1, 0] + TAKE(0) + CBT_DIRTY(1, 10, 7) + CBT_MAP(0, 0, 4)
    cbt += CBT_MAP(1, 0, 8) + DESTROY(0) + CREATE_FILE(5, 5) + ADD(1, 1) + TAKE(1) + CBT_MAP(1, 0, 8)
    write("ops_vs_model", "cbt-switch-map", cbt)
    # Overflow: a small non-growable file; writes until ENOSPC; torn origin write; discard.
    ovf = header([(6, 2)], params=3) + ATTACH(0) + [5, 5, 1, 1] + ADD(0, 0) + TAKE(0)
    for s in range(0, 240, 40):
        ovf += WRITE(0, s, 16, s)
    ovf += TORN(0, 3) + WRITE(0, 10, 8, 2) + DISCARD(0, 0, 64) + IMAGE_READ(0, 0, 64) + WAIT(0)
    ovf += FAIL_GROWTH + ORIGIN_READ_FAULT(0) + IMAGE_READ(0, 200, 8) + ADVANCE + COLLECT
    write("ops_vs_model", "overflow-torn-faults", ovf)


# ---- abi_ioctl (fuzz/fuzz_targets/abi_ioctl.rs) ------------------------------------------------
V3_CODES = ["VERSION", "CREATE", "DESTROY", "APPEND", "TAKE", "COLLECT", "WAIT",
            "ATTACH", "DETACH", "CTL"]
NEWEST_CODES = ["VERSION", "CREATE", "DESTROY", "TAKE", "COLLECT", "WAIT",
                "ATTACH", "DETACH", "CTL"]
V3_SIZE = {"VERSION": 8, "CREATE": 16, "DESTROY": 16, "APPEND": 40, "TAKE": 16,
           "COLLECT": 16, "WAIT": 4096}
NEWEST_SIZE = {"VERSION": 8, "CREATE": 32, "DESTROY": 16, "TAKE": 16, "COLLECT": 16,
               "WAIT": 4096}
BUF = 2  # pointer choice: a real buffer
KNOWN_ID = [1]  # id: the first known id


def ctl_req(v3, name, nested):
    index = V3_CODES.index(name) if v3 else 10 + NEWEST_CODES.index(name)
    size = (V3_SIZE if v3 else NEWEST_SIZE)[name]
    return [0, index, BUF] + [0] * size + nested


def abi_filter(v3, what, tail):
    # path fz0, code (0 attach, 2 detach, 3 ctl), buffer, zeroed struct, "blksnap" name
    code = {"attach": 0, "detach": 2, "ctl": 3}[what]
    size = {"attach": 32 if v3 else 48, "detach": 32, "ctl": 48}[what]
    return [2, 0, code, BUF] + [0] * size + [1] + tail


def ctl_cmd(cmd, optlen, nested):
    # cmd byte, optlen = the struct's size (choice 4), option bytes, nested, option pointer
    return [cmd, 4] + [0] * optlen + nested + [BUF]


def data(op, path, sector, sectors):
    # op: 0 dev pread, 1 image pread, 2 dev pwrite, 3 image pwrite; offset = sector*512
    # (choice 3: u16 % 2048 * 512); len = sectors*512 (choice 2: u8 % 17 * 512); a buffer
    # whose first byte comes from the input.
    return [5, op, path, 3] + u16(sector) + [2, sectors, BUF, 0x5a]


def abi_seeds():
    for v3, name in ((True, "v3"), (False, "newest")):
        s = [0 if v3 else 1]  # profile; parameter set 0 (small)
        s += abi_filter(v3, "attach", [])
        if v3:
            s += ctl_req(True, "CREATE", [])
            # APPEND: id, storage path (choice 1 = the storage file), size = its length, one
            # range {0, 256}.
            s += ctl_req(True, "APPEND", KNOWN_ID + [1, 2, BUF, 1, BUF, 2] + u16(0) + u16(256))
        else:
            # CREATE: limit (choice 2: u16) 4096 sectors, file name = the storage file.
            s += ctl_req(False, "CREATE", [2] + u16(4096) + [1, BUF])
        s += abi_filter(v3, "ctl", ctl_cmd(3, 16, KNOWN_ID))  # snapshotadd
        s += ctl_req(v3, "TAKE", KNOWN_ID)
        s += data(2, 0, 4, 8) + data(1, 0, 0, 16) + data(3, 0, 8, 8) + data(0, 0, 0, 8)
        # cbtmap of 16 blocks from 0 into a 16-byte buffer
        s += abi_filter(v3, "ctl", ctl_cmd(1, 16, [0, 2] + u16(16) + [BUF]))
        s += abi_filter(v3, "ctl", ctl_cmd(4, 36, []))  # snapshotinfo
        s += abi_filter(v3, "ctl", ctl_cmd(0, 40, []))  # cbtinfo
        s += ctl_req(v3, "COLLECT", [4, BUF] + [0] * 64)
        s += ctl_req(v3, "WAIT", KNOWN_ID)
        s += ctl_req(v3, "DESTROY", KNOWN_ID)
        s += abi_filter(v3, "detach", [])
        s += [7]  # dup + close
        write("abi_ioctl", f"{name}-lifecycle", s)
    # cbtdirty with two ranges, then bad pointers: NULL opt, wrapping opt, short optlen.
    s = [1] + abi_filter(False, "attach", [])
    s += abi_filter(False, "ctl", ctl_cmd(2, 16, [2, BUF, 2] + u16(8) + u16(16) + [2] + u16(100) + u16(1)))
    s += [2, 0, 3, BUF] + [0] * 48 + [1, 0, 4] + [0] * 40 + [0]  # cbtinfo, NULL opt
    s += [2, 0, 3, BUF] + [0] * 48 + [1, 0, 4] + [0] * 40 + [1, 7, 0]  # cbtinfo, wrapping opt
    s += [2, 0, 3, BUF] + [0] * 48 + [1, 0, 2] + [0] * 39 + [BUF]  # optlen one short
    s += [0, 200] + u32(0x1234) + [BUF]  # an arbitrary code (size 0: NULL argument): ENOTTY
    write("abi_ioctl", "newest-cbtdirty-bad-pointers", s)


# ---- cbt_and_storage (fuzz/fuzz_targets/cbt_and_storage.rs) ------------------------------------
def cbt_seeds():
    small = [12, 1] + u16(4096) + [20, 12, 40, 20, 1] + u16(64)
    caps = []
    for cap_choice, io_choice, count_choice in ((2, 2, 2), (3, 3, 3), (2, 3, 2), (3, 2, 3)):
        # pick index from the edge tables (value(): choice >= 2 → pick by the next byte)
        caps += [cap_choice, 5 + cap_choice, io_choice, 4 + io_choice, count_choice, 4]
    disk = [8, 1]  # 131 sectors, io_min 8
    ops = [0, 2, 1] + u16(0) + [1, 5, 1] + u16(128) + [1, 8]  # {0,5} and {128, 8} (crosses end)
    ops += [2, 0, 40]  # cbtmap
    ops += [3, 1, 2]  # create (8 sectors, limit 4096), add, take
    ops += [4, 0, 8, 1, 4, 64, 16, 2, 5, 0, 16]  # writes, image read
    ops += [0, 1, 0, 2, 0] + [0, 1]  # a range at the capacity edge
    write("cbt_and_storage", "small-params-take", small + caps + disk + ops)
    default = [16, 2, 4, 26, 18, 40, 26, 2, 4]
    write("cbt_and_storage", "default-params-edges", default + [0] * 24 + [2, 0] + [0, 255, 1] + u16(0) + [1, 0, 0])
    extreme = [9, 2, 1, 62, 62, 40, 62, 2, 6] + [0] + u64(2**64 - 1) + [0] + u64(2**64 - 1) + [0] + u64(1)
    write("cbt_and_storage", "shift-62-capacity-max", extreme + [0] * 18 + [11, 3, 0, 5, 1, 2])


# ---- control_protocol (postcard frames) -------------------------------------------------------
def varint(v):
    out = []
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return out


def frame(body):
    return u32(len(body)) + body


def protocol_version():
    src = os.path.join(os.path.dirname(ROOT), "..", "proto", "src", "lib.rs")
    for line in open(src):
        if line.startswith("pub const PROTOCOL_VERSION: u32 = "):
            return int(line.split("=")[1].strip().rstrip(";"))
    raise SystemExit("PROTOCOL_VERSION not found in proto/src/lib.rs")


PROTOCOL = protocol_version()


def req(variant, fields=()):
    return frame(varint(PROTOCOL) + varint(variant) + list(fields))


def dev(minor):
    return varint(240) + varint(minor)


def string(s):
    b = s.encode()
    return varint(len(b)) + list(b)


def ranges(rs):
    out = varint(len(rs))
    for o, c in rs:
        out += varint(o) + varint(c)
    return out


def sandboxed(kinds):
    """A path the target maps (hash % 6) to one of `kinds`: 0|1 the storage file, 2 an origin's
    backing, 3 the temp dir, 4 a missing file, 5 a spare backing."""
    for i in range(1000):
        p = f"/p{i}"
        h = 0
        for b in p.encode():
            h = (h * 31 + b) & 0xFFFFFFFF
        if h % 6 in kinds:
            return p
    raise SystemExit("no path found")


# Snapshot ids are unknown in advance: the target maps an id of fifteen 0xAA bytes and k to the
# k-th snapshot created in the same input.
def known(k):
    return [0xAA] * 15 + [k]


VERSION, LIST, ATTACH_R, DETACH_R, CBTINFO, CBTMAP, CBTDIRTY, CREATE, DESTROY_R, APPEND_R, \
    ADD_R, TAKE_R, COLLECT_R, INFO_R, WAIT_R, STATS, ADD_DEVICE, REMOVE_DEVICE = range(18)


def proto_seeds():
    s = req(VERSION) + req(LIST) + req(ATTACH_R, dev(1)) + req(CBTINFO, dev(0))
    s += req(CBTDIRTY, dev(0) + ranges([(0, 8), (100, 4)])) + req(CBTMAP, dev(0) + varint(0) + varint(64))
    s += req(CREATE, [1] + string(sandboxed({0, 1})) + varint(4096)) + req(ADD_R, known(0) + dev(0))
    s += req(TAKE_R, known(0)) + req(INFO_R, dev(0)) + req(STATS, known(0)) + req(LIST)
    s += req(COLLECT_R) + req(WAIT_R, known(0) + varint(10)) + req(DESTROY_R, known(0))
    s += req(DETACH_R, dev(0))
    write("control_protocol", "file-storage-lifecycle", s)
    s = req(CREATE, [0]) + req(WAIT_R, known(0) + varint(0))
    s += req(APPEND_R, known(0) + string(sandboxed({0, 1})) + ranges([(0, 512), (1024, 64)]))
    s += req(ATTACH_R, dev(1)) + req(ADD_R, known(0) + dev(1)) + req(ADD_R, known(0) + dev(0))
    s += req(TAKE_R, known(0)) + req(TAKE_R, known(0)) + req(STATS, known(0))
    s += req(REMOVE_DEVICE, dev(1)) + req(DESTROY_R, known(0)) + req(REMOVE_DEVICE, dev(1))
    s += req(ADD_DEVICE, string(sandboxed({5})) + [1]) + req(LIST)
    write("control_protocol", "ranges-storage-lifecycle", s)
    # Invalid fields and frames: relative path, too many... a bad version, a truncated frame.
    s = req(CREATE, [1] + string("relative") + varint(8))
    s += req(CBTDIRTY, dev(0) + ranges([(2**64 - 1, 1)]))
    s += req(CBTMAP, dev(0) + varint(2**32 - 1) + varint(2**32 - 1))
    s += frame(varint(PROTOCOL + 1) + varint(0))  # another protocol version
    s += frame([0xff, 0xff, 0xff])  # malformed
    s += u32(100) + [1, 2, 3]  # truncated
    write("control_protocol", "invalid-requests", s)


def sequence_seeds():
    # control_sequences: bytes drive fuzz/src/lib.rs's reader: client count, each client's
    # principal (even: root, odd: uid 4242), then steps (client, action 0-5 = a request: kind,
    # fields, descriptor count and kinds; 6 junk; 7 truncated frame + reconnect; 8-9 reconnect).
    write("control_sequences", "root-lifecycle",
          [0, 0, 0, 7, 0, 0, 0, 19, 0, 0, 0, 200, 0, 11, 0, 0, 12, 0, 0, 9, 0])
    write("control_sequences", "user-fds", [1, 1, 0, 21, 0, 6, 0, 19, 5, 0, 0, 1, 0, 0, 0, 0, 0])
    write("control_sequences", "junk-and-reconnect",
          [2, 0, 1, 0, 6, 1, 30, 1, 2, 3, 4, 5, 7, 0, 8, 1, 0, 1, 0])


if __name__ == "__main__":
    sequence_seeds()
    ops_seeds()
    abi_seeds()
    cbt_seeds()
    proto_seeds()
    for t in sorted(os.listdir(ROOT)):
        print(t, len(os.listdir(os.path.join(ROOT, t))), "seeds")
