// pinblk: this whole file (PINBLK-PATCHES.md, change 2).
//
//! Small ring accesses (a descriptor, an avail ring entry, a used element,
//! the ring indices) with one region lookup and one volatile access.
//!
//! `Bytes<GuestAddress>` goes through `get_slices`, a slice iterator, a
//! `VolatileSlice` per region and a generic copy for every object, however
//! small: several hundred instructions for 16 bytes, on every descriptor and
//! every used-ring write. These helpers do the same access when the object
//! lies inside one region of plain guest memory at its natural alignment
//! (the virtio 1.2 §2.7 ring layouts guarantee that for a conforming
//! driver), and fall back to the `Bytes` call otherwise, with its errors.
//!
//! Public (hidden) only so that pinblk's tests can hold them to the `Bytes`
//! results: `src/virtio_blk/ring_access_tests.rs`.

use std::mem::{align_of, size_of};
use std::sync::atomic::{AtomicU16, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion,
};

/// The host address of `T` at guest-physical `addr`, and the offset of
/// `addr` in its region, if all `size_of::<T>()` bytes lie in one region of
/// `mem` (no IOMMU in between) and the address is aligned for `T`.
#[inline]
fn host<M, T>(mem: &M, addr: GuestAddress) -> Option<(&<M::PhysicalMemory as GuestMemoryBackend>::R, usize, *mut T)>
where
    M: GuestMemory + ?Sized,
{
    let (region, offset) = mem.physical_memory()?.to_region_addr(addr)?;
    // `to_region_addr` checked that `offset < region.len()`.
    if region.len() - offset.raw_value() < size_of::<T>() as u64 {
        return None;
    }
    let ptr = region.get_host_address(offset).ok()?;
    if ptr as usize % align_of::<T>() != 0 {
        return None;
    }
    Some((region, offset.raw_value() as usize, ptr.cast()))
}

/// `mem.read_obj::<T>(addr)`.
#[inline]
pub fn read_obj<M, T>(mem: &M, addr: GuestAddress) -> Result<T, GuestMemoryError>
where
    M: GuestMemory + ?Sized,
    T: ByteValued,
{
    match host::<M, T>(mem, addr) {
        // SAFETY: `host` checked that the `size_of::<T>()` bytes at `ptr`
        // are inside one mapped region of `mem`, which is borrowed (and so
        // stays mapped) for this call, and that `ptr` is aligned for `T`;
        // `T: ByteValued` has no invalid bit patterns. The guest may store
        // into the bytes concurrently, as with any guest-memory access: the
        // read is volatile, as vm-memory's own.
        Some((_, _, ptr)) => Ok(unsafe { std::ptr::read_volatile(ptr) }),
        None => mem.read_obj(addr),
    }
}

/// `mem.write_obj(val, addr)`, the dirty log marked as vm-memory marks it.
#[inline]
pub fn write_obj<M, T>(mem: &M, val: T, addr: GuestAddress) -> Result<(), GuestMemoryError>
where
    M: GuestMemory + ?Sized,
    T: ByteValued,
{
    match host::<M, T>(mem, addr) {
        Some((region, offset, ptr)) => {
            // SAFETY: as in `read_obj`; the mapping is writable (guest RAM
            // is mapped read-write for a vhost-user backend).
            unsafe { std::ptr::write_volatile(ptr, val) };
            region.bitmap().mark_dirty(offset, size_of::<T>());
            Ok(())
        }
        None => mem.write_obj(val, addr),
    }
}

/// `mem.load::<u16>(addr, order)`.
#[inline]
pub fn load_u16<M>(mem: &M, addr: GuestAddress, order: Ordering) -> Result<u16, GuestMemoryError>
where
    M: GuestMemory + ?Sized,
{
    match host::<M, AtomicU16>(mem, addr) {
        // SAFETY: `host` checked bounds and alignment (an `AtomicU16` has
        // the size and alignment of a `u16`); the reference lives for this
        // expression only, inside the borrow of `mem`.
        Some((_, _, ptr)) => Ok(unsafe { &*ptr }.load(order)),
        None => mem.load(addr, order),
    }
}

/// `mem.store::<u16>(val, addr, order)`, the dirty log marked as vm-memory
/// marks it.
#[inline]
pub fn store_u16<M>(
    mem: &M,
    val: u16,
    addr: GuestAddress,
    order: Ordering,
) -> Result<(), GuestMemoryError>
where
    M: GuestMemory + ?Sized,
{
    match host::<M, AtomicU16>(mem, addr) {
        Some((region, offset, ptr)) => {
            // SAFETY: as in `load_u16`.
            unsafe { &*ptr }.store(val, order);
            region.bitmap().mark_dirty(offset, size_of::<u16>());
            Ok(())
        }
        None => mem.store(val, addr, order),
    }
}
