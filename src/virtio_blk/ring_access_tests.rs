//! The vendored virtio-queue's ring accesses with one region lookup
//! (`virtio_queue::fast`, vendor/virtio-queue/PINBLK-PATCHES.md change 2)
//! against vm-memory's `Bytes` calls they replace: the same bytes, the same
//! errors where they fall back, and the dirty bitmap marked for writes.

use std::sync::atomic::Ordering;

use virtio_queue::fast::{load_u16, read_obj, store_u16, write_obj};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

type Mem = GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

fn mem() -> Mem {
    // Two adjacent regions: 0..0x1000 and 0x1000..0x3000.
    Mem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x2000)]).unwrap()
}

#[test]
fn same_results_as_bytes_inside_across_and_outside_regions() {
    let m = mem();
    m.write_slice(
        &(0..=255u8).cycle().take(0x3000).collect::<Vec<_>>(),
        GuestAddress(0),
    )
    .unwrap();
    for addr in [0u64, 8, 0xff0, 0xffc, 0xffe, 0x1000, 0x2ff8, 0x2ffe] {
        let a = GuestAddress(addr);
        assert_eq!(
            read_obj::<_, u64>(&m, a).ok(),
            m.read_obj::<u64>(a).ok(),
            "{addr:#x}"
        );
        assert_eq!(
            load_u16(&m, a, Ordering::Acquire).ok(),
            m.load::<u16>(a, Ordering::Acquire).ok(),
            "{addr:#x}"
        );
    }
    // Straddling two regions, unaligned, outside memory: the fallback's
    // result (an error or the bytes).
    for addr in [0xffcu64, 0x1003, 0x2ffc, 0x3000, u64::MAX - 1] {
        let a = GuestAddress(addr);
        assert_eq!(
            read_obj::<_, u64>(&m, a).map_err(|e| e.to_string()),
            m.read_obj::<u64>(a).map_err(|e| e.to_string()),
            "{addr:#x}"
        );
    }
    assert!(store_u16(&m, 7, GuestAddress(0x3000), Ordering::Release).is_err());
    assert!(write_obj(&m, 7u64, GuestAddress(0x2ffc)).is_err());
}

#[test]
fn writes_land_and_mark_the_dirty_bitmap() {
    let m = mem();
    write_obj(&m, 0x1122_3344_5566_7788u64, GuestAddress(0x1ff8)).unwrap();
    store_u16(&m, 0xabcd, GuestAddress(0x2002), Ordering::Release).unwrap();
    assert_eq!(
        m.read_obj::<u64>(GuestAddress(0x1ff8)).unwrap(),
        0x1122_3344_5566_7788
    );
    assert_eq!(m.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 0xabcd);
    let r = m.find_region(GuestAddress(0x1000)).unwrap();
    // Region offsets: 0xff8 (page 0) and 0x1002 (page 1) of the second region.
    assert!(r.bitmap().dirty_at(0xff8));
    assert!(r.bitmap().dirty_at(0x1002));
    assert!(!m.find_region(GuestAddress(0)).unwrap().bitmap().dirty_at(0));
}
