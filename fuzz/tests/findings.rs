//! Inputs on which pinblk's parser and the model once disagreed, kept as
//! regression tests once the parser was fixed. A new finding goes here
//! `#[ignore]`d until its fix lands.

use pinblk::virtio_blk::Limits;
use pinblk_fuzz::input::{image_addr, Input};
use pinblk_fuzz::{parse_request, Outcome};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// Image offset of the request header.
const HDR: usize = 0x100;
/// Image offset of the indirect table.
const TABLE: usize = 0x400;

/// A queue of one entry whose only descriptor points at an indirect table
/// holding `descs` (addr, len, device-writable), linked in order.
fn indirect_chain(kind: u32, descs: &[(u64, u32, bool)]) -> Input {
    let mut image = vec![0u8; TABLE + 16 * descs.len()];
    image[HDR..HDR + 4].copy_from_slice(&kind.to_le_bytes());
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        let mut next = 0u16;
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT as u16;
            next = i as u16 + 1;
        }
        let at = TABLE + 16 * i;
        image[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        image[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        image[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        image[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }
    Input {
        queue_size: 1,
        limits: Limits {
            capacity: 2048,
            logical_block_size: 512,
            read_only: false,
            max_transfer: 32 << 20,
        },
        head: 0,
        descs: vec![(
            image_addr(TABLE),
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )],
        image,
    }
}

/// A READ of 1025 descriptors whose last one (past `MAX_SEGMENTS`) is an
/// empty device-writable descriptor: header, 1021 data descriptors of 512
/// bytes, one of 511, a 1-byte status, and the empty one. The parser used to
/// neither refuse the chain (it counted the empty descriptor, yet checked
/// the limit only on non-empty ones) nor take the status byte off the data
/// (it trimmed the status only when at most `MAX_SEGMENTS` descriptors were
/// seen): it accepted a READ of 1022 sectors whose data buffer ended with
/// the status byte. Now the limit counts non-empty descriptors (1024 here,
/// within it) and the status is always taken off: the data is 1022 * 512 - 1
/// bytes, not in logical blocks, refused. The status byte is never READ data.
#[test]
fn empty_descriptors_past_max_segments_never_leave_the_status_in_read_data() {
    let mut descs = vec![(image_addr(HDR), 16, false)];
    descs.extend((0..1021).map(|_| (0x8000, 512, true)));
    descs.push((0x8000, 511, true));
    descs.push((0xf000, 1, true));
    descs.push((0xf000, 0, true));
    assert_eq!(descs.len(), 1025);
    let input = indirect_chain(VIRTIO_BLK_T_IN, &descs);
    let bytes = input.encode();
    assert_eq!(Input::decode(&bytes), input);
    let outcome = std::panic::catch_unwind(|| parse_request(&bytes));
    assert_eq!(
        outcome.ok(),
        Some(Outcome::Refused(Some(
            virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8
        ))),
        "a chain of more than MAX_SEGMENTS descriptors is refused with IOERR"
    );
}
