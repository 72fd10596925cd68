//! Well-formed (and a few deliberately refused) requests, the seed corpus
//! of `parse_request` (checked in under `corpus/parse_request/`, kept equal
//! to this list by `tests/corpus.rs`).

use pinblk::virtio_blk::chain::MAX_SEGMENTS;
use pinblk::virtio_blk::Limits;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use crate::input::{image_addr, Input, HIGH};
use crate::Outcome;

const IOERR: u8 = virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Image offset of the request header.
const HDR: usize = 0x100;
/// Image offset of DISCARD / WRITE_ZEROES segments.
const SEGS: usize = 0x200;
/// Image offset of an indirect descriptor table.
const TABLE: usize = 0x400;
/// Guest-physical address of data buffers (zeroed memory, past the image).
const DATA: u64 = 0x4000;
/// Guest-physical address of data buffers past an indirect table of more
/// than [`MAX_SEGMENTS`] entries at [`TABLE`] (which runs into [`DATA`]).
const MANY_DATA: u64 = 0x8000;
/// Guest-physical address of the status byte.
const STATUS: u64 = 0xf000;

/// A descriptor: (guest address, length, device-writable).
type D = (u64, u32, bool);

fn r(addr: u64, len: u32) -> D {
    (addr, len, false)
}

fn w(addr: u64, len: u32) -> D {
    (addr, len, true)
}

/// `descs` linked 0 -> 1 -> ... as table entries (addr, len, flags, next).
fn linked(descs: &[D]) -> Vec<(u64, u32, u16, u16)> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 } as u16;
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                i as u16 + 1
            } else {
                0
            };
            (addr, len, flags, next)
        })
        .collect()
}

fn put(image: &mut Vec<u8>, off: usize, bytes: &[u8]) {
    if image.len() < off + bytes.len() {
        image.resize(off + bytes.len(), 0);
    }
    image[off..off + bytes.len()].copy_from_slice(bytes);
}

fn outhdr(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

/// `descs` as an indirect table at image offset `at`, and the one direct
/// descriptor that points at it.
fn indirect_table(image: &mut Vec<u8>, at: usize, descs: &[D]) -> Vec<(u64, u32, u16, u16)> {
    let table = linked(descs);
    for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        put(image, at + 16 * i, &d);
    }
    let len = u32::try_from(16 * table.len()).expect("table under 4 GiB");
    vec![(image_addr(at), len, VRING_DESC_F_INDIRECT as u16, 0)]
}

/// A 1 MiB (2048-sector) device with 512-byte blocks and pinblk's default
/// largest transfer (32 MiB), queue size 16, head 0.
fn request(kind: u32, sector: u64, descs: &[D]) -> Input {
    let mut image = Vec::new();
    put(&mut image, HDR, &outhdr(kind, sector));
    Input {
        queue_size: 16,
        limits: Limits {
            capacity: 2048,
            logical_block_size: 512,
            read_only: false,
            max_transfer: 32 << 20,
        },
        head: 0,
        descs: linked(descs),
        image,
    }
}

/// The seeds: (file name, input, the outcome `parse_request` must give).
pub fn seeds() -> Vec<(&'static str, Input, Outcome)> {
    let hdr = image_addr(HDR);
    let segs = image_addr(SEGS);
    let mut out = Vec::new();

    let read = request(
        VIRTIO_BLK_T_IN,
        8,
        &[r(hdr, 16), w(DATA, 4096), w(STATUS, 1)],
    );
    out.push(("read-4k", read, Outcome::Accepted("READ")));

    let mut read4k = request(
        VIRTIO_BLK_T_IN,
        16,
        &[r(hdr, 16), w(DATA, 8192), w(STATUS, 1)],
    );
    read4k.limits.logical_block_size = 4096;
    out.push(("read-lbs4096", read4k, Outcome::Accepted("READ")));

    // Header, data and status in one writable-final framing: the status is
    // the last byte of the data descriptor (virtio 1.2 §2.7.4).
    let merged = request(VIRTIO_BLK_T_IN, 0, &[r(hdr, 16), w(DATA, 513)]);
    out.push((
        "read-status-in-data-desc",
        merged,
        Outcome::Accepted("READ"),
    ));

    let write = request(
        VIRTIO_BLK_T_OUT,
        2040,
        &[
            r(hdr, 16),
            r(DATA, 1024),
            r(HIGH.0 + 0x100, 3072),
            w(STATUS, 1),
        ],
    );
    out.push(("write-two-regions", write, Outcome::Accepted("WRITE")));

    // Header split across descriptors, data in the same descriptor as the
    // header's tail.
    let split = request(
        VIRTIO_BLK_T_OUT,
        4,
        &[r(hdr, 10), r(hdr + 10, 6 + 512), w(STATUS, 1)],
    );
    out.push(("write-split-header", split, Outcome::Accepted("WRITE")));

    let flush = request(VIRTIO_BLK_T_FLUSH, 0, &[r(hdr, 16), w(STATUS, 1)]);
    out.push(("flush", flush, Outcome::Accepted("FLUSH")));

    let get_id = request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[r(hdr, 16), w(DATA, 20), w(STATUS, 1)],
    );
    out.push(("get-id", get_id, Outcome::Accepted("GET_ID")));

    let mut discard = request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[r(hdr, 16), r(segs, 32), w(STATUS, 1)],
    );
    put(&mut discard.image, SEGS, &segment(0, 8, 0));
    put(&mut discard.image, SEGS + 16, &segment(100, 28, 0));
    out.push(("discard-2-segments", discard, Outcome::Accepted("DISCARD")));

    let mut wz = request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[r(hdr, 16), r(segs, 16), w(STATUS, 1)],
    );
    put(
        &mut wz.image,
        SEGS,
        &segment(2000, 48, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
    );
    out.push(("write-zeroes-unmap", wz, Outcome::Accepted("WRITE_ZEROES")));

    // READ through an indirect table (virtio 1.2 §2.7.5.3).
    let mut indirect = request(VIRTIO_BLK_T_IN, 64, &[]);
    indirect.descs = indirect_table(
        &mut indirect.image,
        TABLE,
        &[
            r(hdr, 16),
            w(DATA, 2048),
            w(DATA + 0x1000, 2048),
            w(STATUS, 1),
        ],
    );
    out.push(("read-indirect", indirect, Outcome::Accepted("READ")));

    // Refused on purpose: the status byte is still reported.
    let mut ro = request(
        VIRTIO_BLK_T_OUT,
        0,
        &[r(hdr, 16), r(DATA, 512), w(STATUS, 1)],
    );
    ro.limits.read_only = true;
    out.push(("write-read-only", ro, Outcome::Refused(Some(IOERR))));

    let past = request(
        VIRTIO_BLK_T_IN,
        2047,
        &[r(hdr, 16), w(DATA, 1024), w(STATUS, 1)],
    );
    out.push(("read-past-capacity", past, Outcome::Refused(Some(IOERR))));

    let unknown = request(0x1234, 0, &[r(hdr, 16), w(STATUS, 1)]);
    out.push(("unknown-type", unknown, Outcome::Refused(Some(UNSUPP))));

    // A READ over the largest transfer: IOERR, the status still reported.
    let mut big = request(
        VIRTIO_BLK_T_IN,
        0,
        &[r(hdr, 16), w(DATA, 8192), w(STATUS, 1)],
    );
    big.limits.max_transfer = 4096;
    out.push(("read-over-max-transfer", big, Outcome::Refused(Some(IOERR))));

    // A chain that loops (the status descriptor's NEXT goes back to the data
    // descriptor): it never ends, so it has no status byte; none is written
    // (not even into the last byte the walk saw).
    let mut looped = request(
        VIRTIO_BLK_T_IN,
        0,
        &[r(hdr, 16), w(DATA, 512), w(STATUS, 1)],
    );
    looped.descs[2].2 |= VRING_DESC_F_NEXT as u16;
    looped.descs[2].3 = 1;
    out.push(("read-loop-unterminated", looped, Outcome::Refused(None)));

    // More descriptors than MAX_SEGMENTS (through an indirect table): refused,
    // with the status byte where the whole chain ends, past the limit.
    let mut many = request(VIRTIO_BLK_T_IN, 0, &[]);
    let mut descs = vec![r(hdr, 16)];
    descs.extend((0..MAX_SEGMENTS).map(|_| w(MANY_DATA, 512)));
    descs.push(w(STATUS, 1));
    many.descs = indirect_table(&mut many.image, TABLE, &descs);
    out.push((
        "read-too-many-descriptors",
        many,
        Outcome::Refused(Some(IOERR)),
    ));

    out
}
