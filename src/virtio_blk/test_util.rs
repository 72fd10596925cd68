//! Fixtures for building descriptor chains in guest memory, shared by the
//! chain parser tests here and the data-path tests of `worker`.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::GuestMem;

/// Guest memory size: 16 MiB at guest-physical 0.
pub(crate) const MEM_SIZE: u64 = 0x100_0000;
/// `MEM_SIZE` bytes of guest memory at 0.
pub(crate) fn guest_mmap() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Where [`guest_mmap_two_regions`] splits guest memory.
pub(crate) const REGION_BORDER: u64 = MEM_SIZE / 2;
/// `MEM_SIZE` bytes of guest memory at 0 as two adjacent regions, split at
/// [`REGION_BORDER`]: buffers over the border take the translation's slow path.
pub(crate) fn guest_mmap_two_regions() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_BORDER as usize),
        (
            GuestAddress(REGION_BORDER),
            (MEM_SIZE - REGION_BORDER) as usize,
        ),
    ])
    .unwrap()
}

/// A descriptor as the driver sees it: (guest address, length, device-writable).
pub(crate) type D = (u64, u32, bool);

pub(crate) fn r(addr: u64, len: u32) -> D {
    (addr, len, false)
}

pub(crate) fn w(addr: u64, len: u32) -> D {
    (addr, len, true)
}

pub(crate) fn raw(d: D, flags: u32, next: u16) -> RawDescriptor {
    let f = if d.2 { VRING_DESC_F_WRITE } else { 0 } | flags;
    RawDescriptor::from(SplitDescriptor::new(d.0, d.1, f as u16, next))
}

/// `descs` as one chain whose descriptor `i` sits at index `first + i`.
pub(crate) fn linked(descs: &[D], first: u16) -> Vec<RawDescriptor> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if i + 1 < n {
                raw(d, VRING_DESC_F_NEXT, first + i as u16 + 1)
            } else {
                raw(d, 0, 0)
            }
        })
        .collect()
}

/// Writes `descs` as an indirect descriptor table at `table` (16-byte
/// aligned); returns the descriptor that points at it.
pub(crate) fn indirect_table(mem: &GuestMem, table: u64, descs: &[D]) -> RawDescriptor {
    for (i, d) in linked(descs, 0).into_iter().enumerate() {
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    RawDescriptor::from(SplitDescriptor::new(
        table,
        16 * descs.len() as u32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))
}

/// A `virtio_blk_outhdr`: type, reserved, sector.
pub(crate) fn outhdr(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
