//! Dirty logging for live migration (docs/DESIGN.md §13): with a dirty log
//! set on the guest memory (as SET_LOG_BASE sets it), every completion path
//! marks the 4 KiB pages it wrote — a zero-copy READ's data (io_uring DMA,
//! marked by hand), a bounced READ's copy-out and GET_ID's answer
//! (vm-memory writes), the status byte and the used ring — and nothing
//! else: a WRITE's source and the request headers stay clean.

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::GuestMemoryBackend;

use super::test_util::{
    fill, image_bytes, pattern, r, w, Driver, FakeRig, Io, IOERR, MEM_SIZE, OK, UNSET,
};
use super::GuestMem;
use crate::storage::{FakeHandle, Tag};

const BUF_START: u64 = 0x10_0000;
const BUF_END: u64 = 0x80_0000;
const PAGE: u64 = 4096;
/// Two pages: a buffer that crosses a page boundary marks both.
const LEN: u32 = 2 * PAGE as u32;

/// The frontend's side of the dirty log: a memfd of one bit per 4 KiB
/// page of guest memory, mapped into every region as SET_LOG_BASE maps it.
struct DirtyLog {
    file: File,
}

impl DirtyLog {
    /// Sets a fresh (all clean) log on every region of `gm`.
    fn set(gm: &GuestMem) -> DirtyLog {
        // SAFETY: memfd_create(2) with a valid NUL-terminated name; the fd
        // is owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"pinblk-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = MEM_SIZE / PAGE / 8;
        file.set_len(len).unwrap();
        let log = Arc::new(MmapLogReg::from_file(file.as_fd(), 0, len).unwrap());
        for region in gm.iter() {
            let bitmap = AtomicBitmapMmap::new(region, log.clone()).unwrap();
            // The mapping's own bitmap, as SET_LOG_BASE replaces it (the
            // region's `GuestMemoryRegion::bitmap` is a borrowed slice of it).
            let mapping: &vm_memory::MmapRegion<_> = region;
            mapping.bitmap().replace(bitmap);
        }
        DirtyLog { file }
    }

    /// Whether the page holding guest-physical address `gpa` is marked.
    fn dirty(&self, gpa: u64) -> bool {
        let page = gpa / PAGE;
        let mut byte = [0u8];
        self.file.read_exact_at(&mut byte, page / 8).unwrap();
        byte[0] & (1 << (page % 8)) != 0
    }

    /// Whether every page of `len` bytes at `gpa` is marked.
    fn all_dirty(&self, gpa: u64, len: u64) -> bool {
        (gpa / PAGE..=(gpa + len - 1) / PAGE).all(|p| self.dirty(p * PAGE))
    }

    /// Clears the whole log (the frontend does after each sync).
    fn clear(&self) {
        let len = MEM_SIZE / PAGE / 8;
        self.file.write_all_at(&vec![0u8; len as usize], 0).unwrap();
    }
}

type Rig = FakeRig;

/// `pages` whole guest pages of their own, filled with `byte`.
fn pages(d: &mut Driver<'_>, pages: u64, byte: u8) -> u64 {
    let a = (d.alloc((pages + 1) * PAGE) + PAGE - 1) & !(PAGE - 1);
    fill(d.mem, a, &vec![byte; (pages * PAGE) as usize]);
    a
}

/// A request whose header, data and status byte each sit on pages of
/// their own (so a mark on one cannot stand for a mark on another).
fn request(d: &mut Driver<'_>, kind: u32, sector: u64, data: &[super::test_util::D]) -> (Io, u64) {
    let hdr = pages(d, 1, 0);
    fill(d.mem, hdr, &super::test_util::outhdr(kind, sector));
    let status = pages(d, 1, UNSET);
    let mut descs = vec![r(hdr, 16)];
    descs.extend_from_slice(data);
    descs.push(w(status, 1));
    let head = d.add(&descs);
    let first = data.first().map_or(0, |x| x.0);
    (
        Io {
            head,
            data: first,
            status,
        },
        hdr,
    )
}

fn held_slots(fake: &FakeHandle) -> Vec<u32> {
    fake.held()
        .into_iter()
        .map(|t| match t {
            Tag::Job { slot, .. } => slot,
            other => panic!("unexpected held operation {other:?}"),
        })
        .collect()
}

#[test]
fn every_completion_path_marks_the_dirty_log() {
    let (mut rig, gm) = Rig::new("dirty-log");
    let mut d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    let used_ring = d.used_addr();

    // A zero-copy READ popped and submitted before logging starts.
    let zc = pages(&mut d, 2, 0xee);
    let (early, early_hdr) = request(&mut d, VIRTIO_BLK_T_IN, 0, &[w(zc, LEN)]);
    rig.worker.process_queue(&rig.vring);
    assert_eq!(rig.fake.held().len(), 1);

    let log = DirtyLog::set(&gm);
    assert!(!log.dirty(zc) && !log.dirty(used_ring));

    // A WRITE held by storage, then a READ into the WRITE's source (R2
    // under the default bounce policy: the READ lands in a bounce buffer,
    // copied to the guest once the WRITE is done), a second zero-copy READ
    // that storage fails, and a GET_ID.
    let src = pages(&mut d, 2, 0);
    fill(&gm, src, &pattern(3, LEN as usize));
    let (wr, wr_hdr) = request(&mut d, VIRTIO_BLK_T_OUT, 64, &[r(src, LEN)]);
    let (bounced, _) = request(&mut d, VIRTIO_BLK_T_IN, 128, &[w(src, LEN)]);
    let failed_buf = pages(&mut d, 2, 0xee);
    let (failed, _) = request(&mut d, VIRTIO_BLK_T_IN, 256, &[w(failed_buf, LEN)]);
    let id_buf = pages(&mut d, 1, 0);
    let (get_id, _) = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[w(id_buf, 20)]);
    let (flush, _) = request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
    // What the driver wrote to set these up is not what is under test.
    log.clear();

    rig.worker.process_queue(&rig.vring);
    d.expect(&get_id, OK, 21);
    assert!(log.dirty(id_buf), "GET_ID answer (vm-memory write)");
    assert!(log.dirty(get_id.status), "GET_ID status byte");
    assert!(log.dirty(used_ring), "used ring");
    assert_eq!(
        rig.dev.report().counters().conflicts,
        1,
        "the READ was bounced (R2)"
    );
    log.clear();

    let slots = held_slots(&rig.fake);
    assert_eq!(
        slots.len(),
        5,
        "early READ, WRITE, bounced READ, failing READ, FLUSH"
    );

    // The READ in flight when logging started: its DMA is marked at completion.
    rig.complete_slot(slots[0]);
    d.expect(&early, OK, LEN + 1);
    assert_eq!(d.bytes(zc, LEN as usize), image_bytes(0, LEN as usize));
    assert!(
        log.all_dirty(zc, u64::from(LEN)),
        "zero-copy READ data, both pages"
    );
    assert!(log.dirty(early.status), "status byte");
    assert!(log.dirty(used_ring), "used ring");
    assert!(!log.dirty(early_hdr), "the header is only read");
    log.clear();

    // The bounced READ completes first, but copies out only after the
    // WRITE under DMA from the same pages is done.
    rig.complete_slot(slots[2]);
    d.expect_pending(&bounced);
    assert!(!log.dirty(src), "nothing copied yet");
    rig.complete_slot(slots[1]);
    d.expect(&wr, OK, 1);
    d.expect(&bounced, OK, LEN + 1);
    assert_eq!(
        d.bytes(src, LEN as usize),
        image_bytes(128 * 512, LEN as usize)
    );
    assert!(log.all_dirty(src, u64::from(LEN)), "bounced READ copy-out");
    assert!(
        log.dirty(wr.status) && log.dirty(bounced.status),
        "status bytes"
    );
    assert!(!log.dirty(wr_hdr), "the WRITE's header is only read");
    log.clear();

    // A failed zero-copy READ may have written part of its buffer.
    assert!(rig.fake.fail(
        Tag::Job {
            slot: slots[3],
            op: 0
        },
        -libc::EIO
    ));
    rig.worker.complete(&rig.vring);
    d.expect(&failed, IOERR, 1);
    assert!(
        log.all_dirty(failed_buf, u64::from(LEN)),
        "failed READ data"
    );
    assert!(log.dirty(failed.status), "IOERR status byte");

    // A FLUSH writes only its status byte and the used ring.
    log.clear();
    rig.complete_slot(slots[4]);
    d.expect(&flush, OK, 1);
    assert!(log.dirty(flush.status) && log.dirty(used_ring));
    assert!(!log.dirty(src) && !log.dirty(zc) && !log.dirty(failed_buf));
}

/// Without a log (no SET_LOG_BASE, or before it) nothing is marked and
/// nothing fails: marking is a no-op on an empty region bitmap.
#[test]
fn without_a_log_completions_mark_nothing_and_succeed() {
    let (mut rig, gm) = Rig::new("dirty-log");
    let mut d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    let buf = pages(&mut d, 2, 0xee);
    let (rd, _) = request(&mut d, VIRTIO_BLK_T_IN, 8, &[w(buf, LEN)]);
    rig.worker.process_queue(&rig.vring);
    for slot in held_slots(&rig.fake) {
        rig.complete_slot(slot);
    }
    d.expect(&rd, OK, LEN + 1);
    // A log set afterwards starts clean: nothing was recorded anywhere.
    let log = DirtyLog::set(&gm);
    assert!(!log.dirty(buf) && !log.dirty(rd.status));
}
