//! The vocabulary every part of pinblk shares: guest-physical buffers and
//! the units of a block device.
//!
//! Units (docs/DESIGN.md §1):
//! - **guest-physical address (GPA)**: an address in the guest's physical
//!   memory, as descriptors carry it; [`GuestRange`] is a run of them.
//! - **host-virtual address**: where that memory is mapped in pinblk; only the
//!   storage engine and the integrity checks ever hold one.
//! - **sector**: 512 bytes, virtio-blk's and dm-integrity's unit for every
//!   LBA, whatever the logical block size ([`SECTOR_SIZE`], [`Sector`]).
//! - **guest page**: 4 KiB of guest-physical memory, the unit of pins
//!   ([`GUEST_PAGE_SIZE`]).

use std::fmt;

use smallvec::SmallVec;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, MemoryRegionAddress,
};

/// The dirty-page log of one guest memory region (vhost-user spec,
/// "Migration" and "Log"): one bit per 4 KiB page of guest-physical memory,
/// in the log memory the frontend hands over with SET_LOG_BASE. Until then
/// (and without VHOST_F_LOG_ALL) it logs nothing. Every write vm-memory
/// makes through a [`GuestMem`] marks its pages; what bypasses vm-memory (a
/// kernel DMA into a host-virtual address of guest memory) is marked with
/// [`mark_dirty`].
pub type DirtyLog = vhost_user_backend::bitmap::BitmapMmapRegion;

/// Guest memory as pinblk maps it, with a dirty-page log per region
/// ([`DirtyLog`]) for live migration.
pub type GuestMem = GuestMemoryMmap<DirtyLog>;
/// The shared, replaceable guest memory handle vhost-user-backend hands out
/// (replaced on every SET_MEM_TABLE / ADD_MEM_REG).
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;

/// A virtio-blk sector: always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;

/// log2 of the guest page size: a guest page is named by its guest-physical address >> 12.
pub const GUEST_PAGE_SHIFT: u32 = 12;
/// Size of a guest page in bytes (4 KiB), the unit of all pin counters.
pub const GUEST_PAGE_SIZE: u64 = 1 << GUEST_PAGE_SHIFT;

/// A position on the device in 512-byte sectors (virtio 1.2 §5.2.6: the
/// `sector` field of `virtio_blk_outhdr`), whatever the logical block size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sector(pub u64);

impl Sector {
    /// The byte offset of this sector on the device (`sector * 512`).
    /// Callers validate sectors against the capacity first, so this cannot
    /// overflow for a validated sector (capacity < 2^55 sectors).
    pub fn bytes(self) -> u64 {
        self.0 * SECTOR_SIZE
    }

    /// The sector holding byte `offset` (rounded down).
    pub fn from_bytes(offset: u64) -> Sector {
        Sector(offset / SECTOR_SIZE)
    }
}

impl fmt::Display for Sector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One contiguous guest-physical buffer: `len` bytes starting at guest-physical address `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// Length in bytes (never 0 in a parsed request).
    pub len: u32,
}

impl GuestRange {
    /// Guest-physical address one past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + u64::from(self.len)
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.addr, self.len)
    }
}

/// How many [`GuestRange`]s a [`Ranges`] holds without a heap allocation.
pub const RANGES_INLINE: usize = 4;

/// A request's buffer as a list of guest-physical ranges, in chain order
/// (each a guest-physical address and a length in bytes): what one request
/// carries from the descriptor chain to the pin model and storage. Up to
/// [`RANGES_INLINE`] ranges (a request with a handful of data descriptors)
/// are held inline, so the common request allocates nothing for it; more
/// spill to the heap. Code that only reads ranges takes `&[GuestRange]`.
pub type Ranges = SmallVec<[GuestRange; RANGES_INLINE]>;

/// Takes bytes `skip..skip+len` of a list of ranges, returning them as ranges.
pub fn take_ranges(ranges: &[GuestRange], skip: u64, len: u64) -> Ranges {
    iter_ranges(ranges, skip, len).collect()
}

/// The ranges of bytes `skip..skip+len` of a list of ranges, in order,
/// without allocating (what [`take_ranges`] collects).
pub fn iter_ranges(
    ranges: &[GuestRange],
    mut skip: u64,
    mut len: u64,
) -> impl Iterator<Item = GuestRange> + '_ {
    ranges.iter().filter_map(move |r| {
        if len == 0 {
            return None;
        }
        let rlen = u64::from(r.len);
        if skip >= rlen {
            skip -= rlen;
            return None;
        }
        let n = (rlen - skip).min(len);
        let out = GuestRange {
            addr: r.addr + skip,
            len: n as u32,
        };
        len -= n;
        skip = 0;
        Some(out)
    })
}

/// Marks the 4 KiB guest pages under `ranges` (guest-physical addresses)
/// dirty in the dirty-page log of `mem` (vhost-user spec, "Migration":
/// while VHOST_F_LOG_ALL is on, the backend sets the bit of every page it
/// writes). For writes vm-memory cannot see: io_uring DMA into guest pages
/// through their host-virtual addresses. Call it when the completion is
/// seen, before the used element is pushed. Does nothing while no log is
/// set (the region's [`DirtyLog`] is empty); bytes outside guest memory are
/// skipped.
pub fn mark_dirty(mem: &GuestMem, ranges: &[GuestRange]) {
    use vm_memory::bitmap::Bitmap;
    for r in ranges {
        let (mut addr, end) = (r.addr, r.end());
        while addr < end {
            let Some(region) = mem.find_region(GuestAddress(addr)) else {
                break;
            };
            let offset = addr - region.start_addr().0;
            let n = (end - addr).min(region.len() - offset);
            region.bitmap().mark_dirty(offset as usize, n as usize);
            addr += n;
        }
    }
}

/// The region of `mem` that holds all of the `len` bytes (`len > 0`) at
/// guest-physical `addr`, and the offset of `addr` in it: the fast path of
/// address translation, one region lookup for the common buffer. `None` if
/// the range is empty, reaches outside guest memory or spans regions: the
/// caller then takes vm-memory's general path (`get_slices`), which splits
/// it or reports the error as it always did.
pub fn one_region<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    addr: u64,
    len: u64,
) -> Option<(&M::R, u64)> {
    if len == 0 {
        return None;
    }
    let region = mem.find_region(GuestAddress(addr))?;
    // `find_region` returned the region holding `addr`: no underflow.
    let offset = addr - region.start_addr().0;
    (len <= region.len() - offset).then_some((region, offset))
}

/// Whether the `len` bytes at guest-physical `addr` all lie in guest memory
/// (vm-memory's `GuestMemory::check_range` for read and write access), with
/// one region lookup when they lie in one region.
pub fn range_in_memory<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: usize) -> bool {
    let in_one = mem
        .physical_memory()
        .and_then(|m| one_region(m, addr.0, len as u64))
        .is_some();
    in_one || mem.check_range(addr, len, vm_memory::Permissions::ReadWrite)
}

/// Reads `buf.len()` bytes starting at byte `offset` of a list of guest ranges.
pub fn read_ranges<M: GuestMemory + ?Sized>(
    mem: &M,
    ranges: &[GuestRange],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for r in iter_ranges(ranges, offset, buf.len() as u64) {
        let n = r.len as usize;
        let dst = &mut buf[done..done + n];
        match mem
            .physical_memory()
            .and_then(|m| one_region(m, r.addr, n as u64))
        {
            Some((region, off)) => region.read_slice(dst, MemoryRegionAddress(off))?,
            None => mem.read_slice(dst, GuestAddress(r.addr))?,
        }
        done += n;
    }
    Ok(())
}

/// Writes `buf` starting at byte `offset` of a list of guest ranges. Either
/// path writes through vm-memory, which marks the pages in the dirty log.
pub fn write_ranges<M: GuestMemory + ?Sized>(
    mem: &M,
    ranges: &[GuestRange],
    offset: u64,
    buf: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for r in iter_ranges(ranges, offset, buf.len() as u64) {
        let n = r.len as usize;
        let src = &buf[done..done + n];
        match mem
            .physical_memory()
            .and_then(|m| one_region(m, r.addr, n as u64))
        {
            Some((region, off)) => region.write_slice(src, MemoryRegionAddress(off))?,
            None => mem.write_slice(src, GuestAddress(r.addr))?,
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion, Permissions};

    use super::{one_region, range_in_memory, read_ranges, write_ranges, GuestMem, GuestRange};

    /// 0..0x4000 and 0x4000..0x8000 (adjacent), then a hole, then 0x10000..0x11000.
    fn two_regions_and_a_hole() -> GuestMem {
        GuestMem::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x4000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .unwrap()
    }

    #[test]
    fn one_region_only_for_a_nonempty_range_inside_one_region() {
        let mem = two_regions_and_a_hole();
        let (region, off) = one_region(&mem, 0x4100, 0x200).unwrap();
        assert_eq!((region.start_addr(), off), (GuestAddress(0x4000), 0x100));
        assert_eq!(one_region(&mem, 0x3000, 0x1000).unwrap().1, 0x3000);
        assert!(
            one_region(&mem, 0x3f00, 0x200).is_none(),
            "spans two regions"
        );
        assert!(
            one_region(&mem, 0x7f00, 0x200).is_none(),
            "runs into the hole"
        );
        assert!(one_region(&mem, 0x8000, 1).is_none(), "in the hole");
        assert!(one_region(&mem, 0x10f00, 0x200).is_none(), "past the end");
        assert!(one_region(&mem, u64::MAX, 1).is_none());
        assert!(one_region(&mem, 0x100, 0).is_none(), "empty");
    }

    /// The fast path answers exactly as vm-memory's `check_range`.
    #[test]
    fn range_in_memory_is_check_range() {
        let mem = two_regions_and_a_hole();
        let cases = [
            (0x100, 0x200),
            (0x3f00, 0x200),
            (0x0, 0x8000),
            (0x7f00, 0x200),
            (0x8000, 1),
            (0x10000, 0x1000),
            (0x10f00, 0x200),
            (0x8000, 0),
            (u64::MAX, 1),
            (u64::MAX - 0xfff, 0x1000),
        ];
        for (addr, len) in cases {
            let want =
                GuestMemory::check_range(&mem, GuestAddress(addr), len, Permissions::ReadWrite);
            assert_eq!(
                range_in_memory(&mem, GuestAddress(addr), len),
                want,
                "{addr:#x}+{len:#x}"
            );
        }
        assert!(range_in_memory(&mem, GuestAddress(0x3f00), 0x200));
        assert!(!range_in_memory(&mem, GuestAddress(0x7f00), 0x200));
    }

    #[test]
    fn read_and_write_ranges_within_and_across_regions() {
        let mem = two_regions_and_a_hole();
        let at = |addr, len| GuestRange { addr, len };
        // One range inside a region, one over the border, one in the last region.
        let ranges = [at(0x100, 0x100), at(0x3f80, 0x100), at(0x10000, 0x80)];
        let bytes: Vec<u8> = (0..0x280u32).map(|i| (i * 13 % 251) as u8).collect();
        write_ranges(&mem, &ranges, 0, &bytes).unwrap();
        let mut back = vec![0u8; bytes.len()];
        read_ranges(&mem, &ranges, 0, &mut back).unwrap();
        assert_eq!(back, bytes);
        let mut mid = vec![0u8; 0x100];
        read_ranges(&mem, &ranges, 0x80, &mut mid).unwrap();
        assert_eq!(mid, bytes[0x80..0x180]);
        let mut direct = vec![0u8; 0x100];
        vm_memory::Bytes::read_slice(&mem, &mut direct, GuestAddress(0x3f80)).unwrap();
        assert_eq!(direct, bytes[0x100..0x200]);
        // Past the end of guest memory, or into the hole: the error as before.
        for r in [at(0x10f80, 0x100), at(0x7f80, 0x100), at(0x9000, 0x10)] {
            let mut buf = vec![0u8; r.len as usize];
            assert!(read_ranges(&mem, &[r], 0, &mut buf).is_err(), "{r}");
            assert!(write_ranges(&mem, &[r], 0, &buf).is_err(), "{r}");
        }
    }
}
