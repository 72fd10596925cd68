//! The byte format of a `parse_request` fuzz input, and the guest memory and
//! virtqueue built from it.
//!
//! ```text
//! offset  size      field
//! 0       1         queue size: 1 << (byte % 9), i.e. 1..=256 descriptors
//! 1       1         bit 0: read-only device; bit 1: 4096-byte logical blocks (else 512);
//!                   bits 2..=5: largest transfer, [`MAX_TRANSFERS`]`[(byte >> 2) & 15]`
//! 2       8         capacity in 512-byte sectors, little endian, low 55 bits
//! 10      2         head index the avail ring names (little endian, not checked)
//! 12      1         n: descriptors written to the table (at most the queue size)
//! 13      16 * n    split descriptors 0..n (virtio 1.2 §2.7.5: addr u64, len u32,
//!                   flags u16, next u16, little endian), written as they are
//! 13+16n  rest      guest memory image: [`LOW`] first, then [`HIGH`]
//! ```
//!
//! Missing bytes read as 0. Guest memory has three regions with gaps
//! between them, so that a buffer can run off a region's end or across a
//! hole: [`LOW`], [`HIGH`] and the ring memory at [`RING`]. The descriptors
//! are not otherwise constrained: their addresses may point anywhere,
//! including into the rings and into an indirect table written by the image.

use pinblk::guest::GuestMem;
use pinblk::virtio_blk::Limits;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A guest memory region: (guest-physical start, length in bytes).
pub type Region = (u64, u64);

/// First region: 64 KiB at guest-physical 0, filled from the image.
pub const LOW: Region = (0, 0x1_0000);
/// Second region: 64 KiB at 128 KiB (a 64 KiB hole after [`LOW`]), filled
/// from the image after [`LOW`].
pub const HIGH: Region = (0x2_0000, 0x1_0000);
/// Ring memory: 8 KiB at 1 MiB, enough for a 256-entry split queue
/// (descriptor table 4096 B, avail ring 518 B, used ring 2054 B).
pub const RING: Region = (0x10_0000, 0x2000);
/// Bytes before the descriptors in an input.
pub const HEADER_LEN: usize = 13;

/// The values of [`Limits::max_transfer`] an input can choose: no limit
/// below 4 GiB first (so that inputs without these bits keep their meaning),
/// then values on either side of a sector, a 4 KiB block and the fuzz
/// memory's sizes, then pinblk's default (`serve` offers 32 MiB).
pub const MAX_TRANSFERS: [u32; 16] = [
    u32::MAX,
    0,
    1,
    511,
    512,
    513,
    1024,
    4095,
    4096,
    4097,
    8192,
    0xffff,
    0x1_0000,
    0x2_0000,
    1 << 20,
    32 << 20,
];

/// Whether `len` bytes at guest-physical `addr` lie inside one region of
/// the fuzz guest memory (the regions are not adjacent, so a range that is
/// in memory is in one region). `len` 0 counts as inside.
pub fn in_guest_memory(addr: u64, len: u64) -> bool {
    let end = u128::from(addr) + u128::from(len);
    [LOW, HIGH, RING]
        .iter()
        .any(|&(start, size)| addr >= start && end <= u128::from(start + size))
}

/// One decoded fuzz input (see the module documentation for the format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Queue size (a power of two, 1..=256).
    pub queue_size: u16,
    /// What the request is checked against.
    pub limits: Limits,
    /// Head index in avail ring entry 0.
    pub head: u16,
    /// Descriptor table entries 0.. as (addr, len, flags, next).
    pub descs: Vec<(u64, u32, u16, u16)>,
    /// Guest memory contents: [`LOW`] then [`HIGH`] (the rest stays 0).
    pub image: Vec<u8>,
}

/// Guest-physical address of byte `off` of the image (for building seeds).
pub fn image_addr(off: usize) -> u64 {
    let off = off as u64;
    if off < LOW.1 {
        LOW.0 + off
    } else {
        HIGH.0 + off - LOW.1
    }
}

impl Input {
    /// Decodes `data`; every byte string is a valid input.
    pub fn decode(data: &[u8]) -> Input {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let le =
            |at: usize, n: usize| (0..n).fold(0u64, |v, i| v | u64::from(byte(at + i)) << (8 * i));
        let queue_size = 1u16 << (byte(0) % 9);
        let flags = byte(1);
        let limits = Limits {
            capacity: le(2, 8) & ((1 << 55) - 1),
            logical_block_size: if flags & 2 != 0 { 4096 } else { 512 },
            read_only: flags & 1 != 0,
            max_transfer: MAX_TRANSFERS[usize::from(flags >> 2) & 15],
        };
        let head = le(10, 2) as u16;
        let n = usize::from(byte(12)).min(usize::from(queue_size));
        let descs = (0..n)
            .map(|i| {
                let at = HEADER_LEN + 16 * i;
                (
                    le(at, 8),
                    le(at + 8, 4) as u32,
                    le(at + 12, 2) as u16,
                    le(at + 14, 2) as u16,
                )
            })
            .collect();
        let start = (HEADER_LEN + 16 * n).min(data.len());
        let max_image = (LOW.1 + HIGH.1) as usize;
        let image = data[start..data.len().min(start + max_image)].to_vec();
        Input {
            queue_size,
            limits,
            head,
            descs,
            image,
        }
    }

    /// The inverse of [`Input::decode`] (for seeds). `queue_size` must be a
    /// power of two up to 256, `descs` no longer than it, and
    /// `limits.max_transfer` one of [`MAX_TRANSFERS`].
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.queue_size.is_power_of_two() && self.queue_size <= 256);
        assert!(self.descs.len() <= usize::from(self.queue_size));
        let transfer = MAX_TRANSFERS
            .iter()
            .position(|&m| m == self.limits.max_transfer)
            .expect("max_transfer is one of MAX_TRANSFERS") as u8;
        let mut out = vec![self.queue_size.trailing_zeros() as u8];
        out.push(
            u8::from(self.limits.read_only)
                | u8::from(self.limits.logical_block_size == 4096) << 1
                | transfer << 2,
        );
        out.extend_from_slice(&self.limits.capacity.to_le_bytes());
        out.extend_from_slice(&self.head.to_le_bytes());
        out.push(self.descs.len() as u8);
        for &(addr, len, flags, next) in &self.descs {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&next.to_le_bytes());
        }
        out.extend_from_slice(&self.image);
        out
    }

    /// Guest memory ([`LOW`], [`HIGH`], [`RING`]) with the image written in.
    pub fn guest_memory(&self) -> GuestMem {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(LOW.0), LOW.1 as usize),
            (GuestAddress(HIGH.0), HIGH.1 as usize),
            (GuestAddress(RING.0), RING.1 as usize),
        ])
        .expect("fuzz guest memory");
        let (low, high) = self.image.split_at(self.image.len().min(LOW.1 as usize));
        mem.write_slice(low, GuestAddress(LOW.0))
            .expect("image fits LOW");
        mem.write_slice(high, GuestAddress(HIGH.0))
            .expect("image fits HIGH");
        mem
    }

    /// Writes the descriptor table and one avail ring entry (`head`, avail
    /// index 1) at [`RING`]; returns the queue description.
    pub fn write_queue<'a>(&self, mem: &'a GuestMem) -> MockSplitQueue<'a, GuestMem> {
        let mock = MockSplitQueue::create(mem, GuestAddress(RING.0), self.queue_size);
        for (i, &(addr, len, flags, next)) in self.descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mock.desc_table()
                .store(i as u16, d)
                .expect("descriptor index < queue size");
        }
        mock.avail()
            .ring()
            .ref_at(0)
            .expect("avail ring has an entry 0")
            .store(self.head);
        mock.avail().idx().store(1);
        mock
    }
}
