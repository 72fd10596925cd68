//! Fixtures shared by the data-path unit tests ([`super::tests`],
//! [`super::policy_tests`]) and the chain parser tests of
//! `transport::request`: the initial image, guest memory, descriptors, and
//! the driver side of a virtqueue (a `MockSplitQueue` plus a bump allocator)
//! with what it reads back (used ring, status bytes, guest buffers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::{GuestMem, GuestMemAtomic, Vring};
use crate::device::{Device, DeviceParts};
use crate::storage::{Image, ImageOptions};
use crate::virtio_blk::config::DeviceConfig;

/// Virtqueue size.
pub(crate) const QSIZE: u16 = 256;
/// Image size: 1 MiB = 2048 sectors.
pub(crate) const IMAGE_SIZE: u64 = 1 << 20;

pub(crate) const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What the driver puts in the status byte before submitting.
pub(crate) const UNSET: u8 = 0xa5;

/// The initial image contents: every byte depends on its offset.
fn image_byte(off: u64) -> u8 {
    ((off / 512) as u8) ^ ((off % 251) as u8)
}

/// `len` bytes of the initial image contents at byte offset `off`.
pub(crate) fn image_bytes(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| image_byte(off + i)).collect()
}

/// Data for a WRITE, different from the initial image contents (and odd,
/// so never 0 and never an even fill byte).
pub(crate) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
        .collect()
}

/// Writes the initial contents (`IMAGE_SIZE` bytes) to `dir/disk.img` and
/// opens it with 512-byte logical blocks.
pub(crate) fn image_file(dir: &Path, read_only: bool) -> (PathBuf, Image) {
    let path = dir.join("disk.img");
    std::fs::write(&path, image_bytes(0, IMAGE_SIZE as usize)).unwrap();
    let image = Image::open(
        &path,
        &ImageOptions {
            read_only,
            logical_block_size: Some(512),
            aio: crate::storage::Aio::IoUring,
            ..Default::default()
        },
    )
    .unwrap();
    (path, image)
}

/// A device over `image` (`IMAGE_SIZE`, 512-byte blocks, queues of `QSIZE`),
/// with the default [`DeviceParts`].
pub(crate) fn device(image: Image, num_queues: u16, read_only: bool, serial: &str) -> Device {
    device_with(image, num_queues, read_only, serial, DeviceParts::default())
}

/// [`device`] built from `parts` (policy, pin tracker settings, report, ...).
pub(crate) fn device_with(
    image: Image,
    num_queues: u16,
    read_only: bool,
    serial: &str,
    parts: DeviceParts,
) -> Device {
    Device::from_parts(
        DeviceConfig {
            capacity_sectors: IMAGE_SIZE / 512,
            logical_block_size: 512,
            num_queues,
            queue_size: QSIZE,
            read_only,
            serial: serial.into(),
            max_transfer: crate::device::DEFAULT_MAX_TRANSFER,
            topology: Default::default(),
        },
        image,
        parts,
    )
}

/// `guest_mmap()` shared as a vhost-user backend has it, and a plain handle on it.
pub(crate) fn guest_memory() -> (GuestMemAtomic, Arc<GuestMem>) {
    let mem: GuestMemAtomic = GuestMemoryAtomic::new(guest_mmap());
    let gm = mem.memory().into_inner();
    (mem, gm)
}

/// Writes `bytes` to guest memory at `addr`.
pub(crate) fn fill(gm: &GuestMem, addr: u64, bytes: &[u8]) {
    gm.write_slice(bytes, GuestAddress(addr)).unwrap();
}

/// `len` bytes of guest memory at `addr`.
pub(crate) fn peek(gm: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    gm.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A vring of `QSIZE` on `mem`, not yet pointed at any ring.
pub(crate) fn vring(mem: &GuestMemAtomic) -> Vring {
    Vring::new(mem.clone(), QSIZE).unwrap()
}

/// Every line of a JSON Lines report file (none if there is no file).
pub(crate) fn report_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("report line is JSON"))
        .collect()
}

pub(crate) use crate::virtio_blk::test_util::{
    guest_mmap, indirect_table, linked, outhdr, r, w, D, MEM_SIZE,
};

/// A request as the driver submitted it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Io {
    pub(crate) head: u16,
    /// First data buffer (READ destination, WRITE source, GET_ID answer).
    pub(crate) data: u64,
    pub(crate) status: u64,
}

/// The driver side of one queue: a MockSplitQueue plus a bump allocator for
/// buffers.
pub(crate) struct Driver<'a> {
    pub(crate) mem: &'a GuestMem,
    q: MockSplitQueue<'a, GuestMem>,
    next_desc: u16,
    next_buf: u64,
    buf_end: u64,
}

impl<'a> Driver<'a> {
    /// A driver whose rings are at `rings` in `gm`, with `vring` pointed at
    /// them and enabled, and buffers allocated in `bufs`.
    pub(crate) fn new(
        gm: &'a GuestMem,
        vring: &Vring,
        rings: u64,
        bufs: std::ops::Range<u64>,
    ) -> Driver<'a> {
        let q = MockSplitQueue::create(gm, GuestAddress(rings), QSIZE);
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Driver {
            mem: gm,
            q,
            next_desc: 0,
            next_buf: bufs.start,
            buf_end: bufs.end,
        }
    }

    pub(crate) fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        // Odd alignment on purpose: buffers need not be page or sector aligned.
        self.next_buf = (a + len + 0x3f) & !0x1f;
        assert!(self.next_buf < self.buf_end, "test buffer area exhausted");
        a
    }

    pub(crate) fn buf(&mut self, bytes: &[u8]) -> u64 {
        let a = self.alloc(bytes.len() as u64);
        fill(self.mem, a, bytes);
        a
    }

    /// A `virtio_blk_outhdr`.
    pub(crate) fn header(&mut self, kind: u32, sector: u64) -> u64 {
        self.buf(&outhdr(kind, sector))
    }

    /// A status byte, `UNSET`.
    pub(crate) fn status(&mut self) -> u64 {
        self.buf(&[UNSET])
    }

    /// Makes `descs` available as one direct chain; returns its head index.
    pub(crate) fn add(&mut self, descs: &[D]) -> u16 {
        let n = descs.len();
        // Never reuse a descriptor index, so that every head is unique in the used ring.
        assert!(usize::from(self.next_desc) + n <= usize::from(QSIZE));
        let head = self.next_desc;
        self.q.add_desc_chains(&linked(descs, head), head).unwrap();
        self.next_desc += n as u16;
        head
    }

    /// Makes `descs` available through one indirect descriptor.
    pub(crate) fn add_indirect(&mut self, descs: &[D]) -> u16 {
        assert!(self.next_desc < QSIZE);
        let table = self.alloc(16 * descs.len() as u64 + 16) & !0xf;
        let ind = indirect_table(self.mem, table + 16, descs);
        let head = self.next_desc;
        self.q.add_desc_chains(&[ind], head).unwrap();
        self.next_desc += 1;
        head
    }

    /// Makes available a request of `kind` at `sector`: a 16-byte header,
    /// `middle`, then a status byte. `data` is what `Io::data` names.
    pub(crate) fn request_with(&mut self, kind: u32, sector: u64, data: u64, middle: &[D]) -> Io {
        let h = self.header(kind, sector);
        let s = self.status();
        let mut descs = Vec::with_capacity(middle.len() + 2);
        descs.push(r(h, 16));
        descs.extend_from_slice(middle);
        descs.push(w(s, 1));
        let head = self.add(&descs);
        Io {
            head,
            data,
            status: s,
        }
    }

    /// Guest-physical address of the used ring.
    pub(crate) fn used_addr(&self) -> u64 {
        self.q.used_addr().0
    }

    /// Sets the avail ring's index, whatever the descriptors (a hostile driver).
    pub(crate) fn set_avail_idx(&self, idx: u16) {
        self.q.avail().idx().store(idx);
    }

    pub(crate) fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        peek(self.mem, addr, len)
    }

    pub(crate) fn status_of(&self, io: &Io) -> u8 {
        self.mem.read_obj(GuestAddress(io.status)).unwrap()
    }

    /// Used elements so far, head index -> used length (each head exactly once).
    pub(crate) fn used(&self) -> HashMap<u16, u32> {
        let n = self.q.used().idx().load();
        let mut m = HashMap::new();
        for i in 0..n {
            let e = self.q.used().ring().ref_at(usize::from(i)).unwrap().load();
            let prev = m.insert(e.id() as u16, e.len());
            assert!(prev.is_none(), "head {} used twice", e.id());
        }
        m
    }

    pub(crate) fn done(&self, io: &Io) -> bool {
        self.used().contains_key(&io.head)
    }

    /// Asserts `io` completed with `status` and used length `len`.
    pub(crate) fn expect(&self, io: &Io, status: u8, len: u32) {
        let used = self.used();
        assert_eq!(
            used.get(&io.head),
            Some(&len),
            "used length of head {} (used ring {used:?})",
            io.head
        );
        assert_eq!(self.status_of(io), status, "status of head {}", io.head);
    }

    /// Asserts `io` has no used element and its status byte is untouched.
    pub(crate) fn expect_pending(&self, io: &Io) {
        assert!(!self.done(io), "head {} completed early", io.head);
        assert_eq!(self.status_of(io), UNSET, "status of head {}", io.head);
    }
}

/// One worker of queue 0 over a fresh 1 MiB image on the fake storage
/// engine (storage operations complete when the test says), with its
/// guest memory's vring. Test modules add their own methods to it.
pub(crate) struct FakeRig {
    pub(crate) _dir: tempfile::TempDir,
    /// The image file.
    pub(crate) path: PathBuf,
    pub(crate) dev: Arc<Device>,
    pub(crate) vring: Vring,
    pub(crate) worker: super::QueueWorker,
    pub(crate) fake: crate::storage::FakeHandle,
}

impl FakeRig {
    /// A rig whose device answers GET_ID with `serial`, and its guest memory.
    pub(crate) fn new(serial: &str) -> (FakeRig, Arc<GuestMem>) {
        let dir = tempfile::tempdir().unwrap();
        let (path, image) = image_file(dir.path(), false);
        let dev = Arc::new(device(image, 1, false, serial));
        let (mem, gm) = guest_memory();
        let vring = vring(&mem);
        let (engine, fake) = crate::storage::Engine::fake(dev.image().file());
        let worker = super::QueueWorker::with_engine(dev.clone(), mem, 0, engine).unwrap();
        let rig = FakeRig {
            _dir: dir,
            path,
            dev,
            vring,
            worker,
            fake,
        };
        (rig, gm)
    }

    /// Completes the held storage operation of the request in `slot`, then
    /// lets the worker see it (as its completion eventfd would).
    pub(crate) fn complete_slot(&mut self, slot: u32) {
        assert!(
            self.fake.complete(crate::storage::Tag::Job { slot, op: 0 }),
            "no operation held for slot {slot}: {:?}",
            self.fake.held()
        );
        self.worker.complete(&self.vring);
    }
}
