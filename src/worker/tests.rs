//! Unit tests of the data path with virtio-queue MockSplitQueue.
//!
//! Each test builds a real image file (tempfile), a real io_uring (through
//! [`QueueWorker`]), guest memory and a vring laid out by `MockSplitQueue`,
//! plays the driver (descriptor chains into the avail ring), runs
//! `process_queue` + `drain`, and checks the used ring, the status bytes, the
//! image file and the guest buffers.

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::test_util::{
    device, guest_memory, image_bytes, image_file, outhdr, pattern, r, vring, w, Driver, Io, D,
    IMAGE_SIZE, IOERR, MEM_SIZE, OK, QSIZE, UNSET, UNSUPP,
};
use super::{GuestMem, QueueWorker, Vring};
use crate::device::Device;
use vhost_user_backend::VringT;

const CAPACITY: u64 = IMAGE_SIZE / 512;
/// Buffers are allocated from here up to `BUF_END`.
const BUF_START: u64 = 0x10_0000;
const BUF_END: u64 = 0x80_0000;
const SERIAL: &str = "pinblk-test-serial";

/// The device side: image, device, vring and worker.
struct Backend {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: Arc<Device>,
    gm: Arc<GuestMem>,
    vring: Vring,
    worker: QueueWorker,
}

impl Backend {
    /// A backend and (a handle on) its guest memory, for `Backend::driver`.
    fn new(read_only: bool) -> (Backend, Arc<GuestMem>) {
        let dir = tempfile::tempdir().unwrap();
        let (path, image) = image_file(dir.path(), read_only);
        assert_eq!(image.capacity_sectors(), CAPACITY);
        let dev = Arc::new(device(image, 1, read_only, SERIAL));
        let (mem, gm) = guest_memory();
        let vring = vring(&mem);
        let worker = QueueWorker::new(dev.clone(), mem, 0).unwrap();
        let b = Backend {
            _dir: dir,
            path,
            dev,
            gm: gm.clone(),
            vring,
            worker,
        };
        (b, gm)
    }

    /// The driver: rings at 0 (descriptor table, then the rings), buffers
    /// from `BUF_START`. `gm` is the backend's guest memory (a clone of
    /// `Backend::gm`, so that the driver does not borrow the backend).
    fn driver<'a>(&self, gm: &'a GuestMem) -> Driver<'a> {
        assert!(std::ptr::eq(gm, &*self.gm));
        Driver::new(gm, &self.vring, 0, BUF_START..BUF_END)
    }

    /// A kick: pop and start everything, then wait for every completion.
    fn run(&mut self) {
        self.worker.process_queue(&self.vring);
        self.worker.drain();
        assert_eq!(self.worker.inflight(), 0);
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

/// Request builders of these tests.
impl Driver<'_> {
    /// A READ of `len` bytes at `sector`, the data split in `parts` descriptors.
    fn read_split(&mut self, sector: u64, len: u32, parts: u32) -> Io {
        let data = self.buf(&vec![0xee; len as usize]);
        let mut descs = Vec::new();
        let mut off = 0;
        for i in 0..parts {
            let n = if i + 1 == parts {
                len - off
            } else {
                len / parts - 3
            };
            descs.push(w(data + u64::from(off), n));
            off += n;
        }
        self.request_with(VIRTIO_BLK_T_IN, sector, data, &descs)
    }

    fn read(&mut self, sector: u64, len: u32) -> Io {
        self.read_split(sector, len, 1)
    }

    /// A WRITE of `bytes` at `sector`, with the header and the first data
    /// bytes in one descriptor and the rest in a second one.
    fn write(&mut self, sector: u64, bytes: &[u8]) -> Io {
        let mut hd = Vec::with_capacity(16 + bytes.len());
        hd.extend_from_slice(&outhdr(VIRTIO_BLK_T_OUT, sector));
        hd.extend_from_slice(bytes);
        let a = self.buf(&hd);
        let s = self.status();
        let split = 16 + (bytes.len() as u32 / 3);
        let descs = if bytes.is_empty() {
            vec![r(a, 16), w(s, 1)]
        } else {
            vec![
                r(a, split),
                r(a + u64::from(split), hd.len() as u32 - split),
                w(s, 1),
            ]
        };
        let head = self.add(&descs);
        Io {
            head,
            data: a + 16,
            status: s,
        }
    }

    /// A request with a header and a status only (FLUSH, unknown types).
    fn bare(&mut self, kind: u32, sector: u64) -> Io {
        self.request_with(kind, sector, 0, &[])
    }

    fn get_id(&mut self, len: u32) -> Io {
        // 4 bytes more than the descriptor says, to see nothing is written past it.
        let data = self.buf(&vec![0xee; len as usize + 4]);
        self.request_with(VIRTIO_BLK_T_GET_ID, 0, data, &[w(data, len)])
    }

    /// A DISCARD or WRITE_ZEROES with segments (sector, num_sectors, flags).
    fn segments(&mut self, kind: u32, segs: &[(u64, u32, u32)]) -> Io {
        let mut b = Vec::new();
        for &(sector, num, flags) in segs {
            b.extend_from_slice(&sector.to_le_bytes());
            b.extend_from_slice(&num.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
        }
        let data = self.buf(&b);
        self.request_with(kind, 0, data, &[r(data, b.len() as u32)])
    }
}

/// Adds a good READ before and a good WRITE after whatever `bad` adds, runs
/// the batch, and checks the good ones completed properly. Returns the
/// driver and backend for the caller to check the bad one.
fn with_neighbours<'a>(
    d: &mut Driver<'a>,
    b: &mut Backend,
    bad: impl FnOnce(&mut Driver<'a>) -> Io,
) -> Io {
    let before = d.read(100, 1024);
    let io = bad(d);
    let data = pattern(0x40, 512);
    let after = d.write(200, &data);
    b.run();
    d.expect(&before, OK, 1025);
    assert_eq!(d.bytes(before.data, 1024), image_bytes(100 * 512, 1024));
    d.expect(&after, OK, 1);
    assert_eq!(&b.image()[200 * 512..201 * 512], &data[..]);
    assert_eq!(d.used().len(), 3);
    io
}

/// Runs `bad` between two good requests and expects it to complete with
/// `status` (used length 1) and the image outside sector 200 to be untouched.
fn expect_refused<'a>(
    d: &mut Driver<'a>,
    b: &mut Backend,
    status: u8,
    bad: impl FnOnce(&mut Driver<'a>) -> Io,
) {
    let io = with_neighbours(d, b, bad);
    d.expect(&io, status, 1);
    let img = b.image();
    assert_eq!(img.len() as u64, IMAGE_SIZE, "image size changed");
    assert_eq!(&img[..200 * 512], &image_bytes(0, 200 * 512)[..]);
    assert_eq!(
        &img[201 * 512..],
        &image_bytes(201 * 512, IMAGE_SIZE as usize - 201 * 512)[..]
    );
}

/// `expect_refused` on a new read-write backend; returns the backend.
fn refused(status: u8, bad: impl FnOnce(&mut Driver<'_>) -> Io) -> Backend {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    expect_refused(&mut d, &mut b, status, bad);
    b
}

/// `refused(IOERR, ..)` of a READ and, on another backend, of a WRITE, both
/// of `len` bytes at `sector` (the WRITE of `pattern(seed, len)`).
fn read_and_write_refused(sector: u64, len: u32, seed: u8) {
    refused(IOERR, |d| d.read(sector, len));
    refused(IOERR, |d| d.write(sector, &pattern(seed, len as usize)));
}

#[test]
fn write_then_read_round_trip() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let data = pattern(1, 8192);
    let wr = d.write(8, &data);
    b.run();
    d.expect(&wr, OK, 1);
    let img = b.image();
    assert_eq!(&img[8 * 512..8 * 512 + 8192], &data[..]);
    assert_eq!(&img[..8 * 512], &image_bytes(0, 8 * 512)[..]);
    assert_eq!(
        &img[8 * 512 + 8192..],
        &image_bytes(8 * 512 + 8192, IMAGE_SIZE as usize - 8 * 512 - 8192)[..]
    );

    // Read it back in three odd-sized descriptors, plus the untouched
    // neighbourhood and the last sector of the disk.
    let rd = d.read_split(8, 8192, 3);
    let around = d.read(4, 512 * 20);
    let last = d.read(CAPACITY - 1, 512);
    b.run();
    d.expect(&rd, OK, 8193);
    assert_eq!(d.bytes(rd.data, 8192), data);
    d.expect(&around, OK, 512 * 20 + 1);
    let mut want = image_bytes(4 * 512, 512 * 20);
    want[4 * 512..4 * 512 + 8192].copy_from_slice(&data);
    assert_eq!(d.bytes(around.data, 512 * 20), want);
    d.expect(&last, OK, 513);
    assert_eq!(d.bytes(last.data, 512), image_bytes(IMAGE_SIZE - 512, 512));

    let c = b.dev.counters();
    assert_eq!(c.requests, 4);
    assert_eq!(c.bytes_written, 8192);
    assert_eq!(c.bytes_read, 8192 + 512 * 20 + 512);
    assert_eq!((c.ioerr, c.unsupp, c.dropped), (0, 0, 0));
}

#[test]
fn many_requests_in_one_batch() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let ios: Vec<(Io, Vec<u8>)> = (0..40u64)
        .map(|i| {
            let data = pattern(i as u8, 1024);
            (d.write(i * 16, &data), data)
        })
        .collect();
    b.run();
    let img = b.image();
    for (i, (io, data)) in ios.iter().enumerate() {
        d.expect(io, OK, 1);
        let off = i * 16 * 512;
        assert_eq!(&img[off..off + 1024], &data[..]);
    }
    let reads: Vec<Io> = (0..40u64).map(|i| d.read(i * 16, 1024)).collect();
    b.run();
    for (io, (_, data)) in reads.iter().zip(&ios) {
        d.expect(io, OK, 1025);
        assert_eq!(&d.bytes(io.data, 1024), data);
    }
    assert_eq!(d.used().len(), 80);
}

/// The ring-stop and ring-start lines name the last heads made available
/// and the last used elements (head:len) as they are in guest memory, in
/// ring order: what tells, after a migration, whether the destination's
/// used ring is the one the source wrote.
#[test]
fn ring_state_shows_the_last_entries_of_both_rings() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let ios: Vec<Io> = (0..11u64)
        .map(|i| d.write(i * 8, &pattern(i as u8, 512)))
        .collect();
    b.run();
    let read = d.read(0, 1024);
    b.run();
    let state = b.worker.ring_state(&b.vring);
    let (indices, rings) = state.split_once("; last heads made available [").unwrap();
    assert_eq!(
        indices,
        "next avail 12, next used 12; in guest memory: avail idx 12, used idx 12"
    );
    let (avail, used) = rings
        .strip_suffix(']')
        .and_then(|r| r.split_once("]; last used elements (head:len) ["))
        .unwrap_or_else(|| panic!("{state}"));
    // The avail ring in submission order; the used ring in completion
    // order, which for the WRITEs (used length 1, the status byte) the
    // storage engine decides, and the READ (1024 + 1) after them.
    let heads: Vec<String> = ios
        .iter()
        .chain([&read])
        .map(|io| io.head.to_string())
        .collect();
    assert_eq!(avail, heads.join(" "));
    let mut used: Vec<&str> = used.split(' ').collect();
    assert_eq!(used.pop(), Some(&*format!("{}:1025", read.head)));
    used.sort_unstable();
    let mut want: Vec<String> = ios.iter().map(|io| format!("{}:1", io.head)).collect();
    want.sort_unstable();
    assert_eq!(used, want);
}

#[test]
fn indirect_read() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let h = d.header(VIRTIO_BLK_T_IN, 2);
    let data = d.alloc(1536);
    let s = d.status();
    let head = d.add_indirect(&[r(h, 16), w(data, 1000), w(data + 1000, 536), w(s, 1)]);
    let io = Io {
        head,
        data,
        status: s,
    };
    b.run();
    d.expect(&io, OK, 1537);
    assert_eq!(d.bytes(data, 1536), image_bytes(1024, 1536));
}

#[test]
fn zero_length_read_and_write() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let rd = d.bare(VIRTIO_BLK_T_IN, 5);
    let wr = d.write(5, &[]);
    b.run();
    d.expect(&rd, OK, 1);
    d.expect(&wr, OK, 1);
    assert_eq!(b.image(), image_bytes(0, IMAGE_SIZE as usize));
}

#[test]
fn flush_ok() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let wr = d.write(0, &pattern(3, 512));
    b.run();
    let fl = d.bare(VIRTIO_BLK_T_FLUSH, 0);
    b.run();
    d.expect(&wr, OK, 1);
    d.expect(&fl, OK, 1);
    assert_eq!(b.dev.counters().flushes, 1);
}

#[test]
fn get_id_returns_serial() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let full = d.get_id(20);
    let short = d.get_id(8);
    b.run();
    let mut want = SERIAL.as_bytes().to_vec();
    want.resize(20, 0);
    d.expect(&full, OK, 21);
    assert_eq!(d.bytes(full.data, 20), want);
    d.expect(&short, OK, 9);
    assert_eq!(d.bytes(short.data, 8), &want[..8]);
    assert_eq!(d.bytes(short.data + 8, 4), [0xee; 4]);
    assert_eq!(d.bytes(full.data + 20, 4), [0xee; 4]);
}

#[test]
fn discard_then_read_gives_zeros() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    // Two segments: sectors 8..16 (one 4 KiB block) and 32..48.
    let ds = d.segments(VIRTIO_BLK_T_DISCARD, &[(8, 8, 0), (32, 16, 0)]);
    b.run();
    d.expect(&ds, OK, 1);
    let rd = d.read(0, 64 * 512);
    b.run();
    d.expect(&rd, OK, 64 * 512 + 1);
    let mut want = image_bytes(0, 64 * 512);
    want[8 * 512..16 * 512].fill(0);
    want[32 * 512..48 * 512].fill(0);
    assert_eq!(d.bytes(rd.data, 64 * 512), want);
    assert_eq!(
        b.image().len() as u64,
        IMAGE_SIZE,
        "discard changed the size"
    );
    assert_eq!(b.dev.counters().discards, 1);
}

#[test]
fn write_zeroes() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    // Unaligned to 4 KiB on purpose; one segment with UNMAP, one of 0 sectors.
    let wz = d.segments(
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[
            (1, 3, 0),
            (20, 9, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            (40, 0, 0),
        ],
    );
    b.run();
    d.expect(&wz, OK, 1);
    let mut want = image_bytes(0, IMAGE_SIZE as usize);
    want[512..4 * 512].fill(0);
    want[20 * 512..29 * 512].fill(0);
    assert_eq!(b.image(), want);
    let rd = d.read(0, 32 * 512);
    b.run();
    d.expect(&rd, OK, 32 * 512 + 1);
    assert_eq!(d.bytes(rd.data, 32 * 512), &want[..32 * 512]);
}

#[test]
fn no_status_descriptor() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let io = with_neighbours(&mut d, &mut b, |d| {
        let h = d.header(VIRTIO_BLK_T_OUT, 300);
        let data = d.buf(&pattern(9, 512));
        let head = d.add(&[r(h, 16), r(data, 512)]);
        Io {
            head,
            data,
            status: data + 511,
        }
    });
    assert_eq!(d.used().get(&io.head), Some(&0));
    // Nothing written anywhere: not the "status", not the image.
    assert_eq!(d.bytes(io.data, 512), pattern(9, 512));
    assert_eq!(
        &b.image()[300 * 512..301 * 512],
        &image_bytes(300 * 512, 512)[..]
    );
    assert_eq!(b.dev.counters().dropped, 1);
}

#[test]
fn readable_after_writable_is_dropped_without_status() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let io = with_neighbours(&mut d, &mut b, |d| {
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let data = d.alloc(512);
        let s = d.status();
        let extra = d.buf(&[0; 16]);
        let head = d.add(&[r(h, 16), w(data, 512), w(s, 1), r(extra, 16)]);
        Io {
            head,
            data,
            status: s,
        }
    });
    assert_eq!(d.used().get(&io.head), Some(&0));
    assert_eq!(d.status_of(&io), UNSET);
}

#[test]
fn short_header_is_ioerr() {
    let b = refused(IOERR, |d| {
        let h = d.header(VIRTIO_BLK_T_OUT, 0);
        let s = d.status();
        let head = d.add(&[r(h, 12), w(s, 1)]);
        Io {
            head,
            data: 0,
            status: s,
        }
    });
    assert_eq!(b.dev.counters().ioerr, 1);
}

/// `refused(IOERR, ..)` of a request of `kind` whose 512-byte data buffer
/// is `data_desc` (the wrong direction).
fn wrong_direction_refused(kind: u32, data_desc: fn(u64, u32) -> D) {
    refused(IOERR, |d| {
        let data = d.buf(&[0x11; 512]);
        d.request_with(kind, 0, data, &[data_desc(data, 512)])
    });
}

#[test]
fn wrong_direction_read_is_ioerr() {
    // READ whose data buffer is device-readable.
    wrong_direction_refused(VIRTIO_BLK_T_IN, r);
}

#[test]
fn wrong_direction_write_is_ioerr() {
    // WRITE whose data buffer is device-writable.
    wrong_direction_refused(VIRTIO_BLK_T_OUT, w);
}

#[test]
fn past_capacity_is_ioerr() {
    for (sector, len) in [
        (CAPACITY - 1, 1024),
        (CAPACITY, 512),
        (CAPACITY + 1000, 0),
        (u64::MAX, 512),
        (u64::MAX / 512 + 1, 512),
        (1 << 60, 4096),
    ] {
        read_and_write_refused(sector, len, 5);
    }
}

#[test]
fn segment_past_capacity_is_ioerr() {
    for (sector, num) in [
        (CAPACITY - 1, 2),
        (CAPACITY, 1),
        (u64::MAX, 1),
        (u64::MAX - 1, 8),
    ] {
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            refused(IOERR, |d| d.segments(kind, &[(0, 1, 0), (sector, num, 0)]));
        }
    }
}

#[test]
fn bad_segment_list_is_ioerr() {
    // No segment at all.
    refused(IOERR, |d| d.segments(VIRTIO_BLK_T_DISCARD, &[]));
    // A segment list that is not a multiple of 16 bytes.
    refused(IOERR, |d| {
        let data = d.buf(&[0; 24]);
        d.request_with(VIRTIO_BLK_T_WRITE_ZEROES, 0, data, &[r(data, 24)])
    });
    // More segments than max_discard_seg (32).
    let segs: Vec<(u64, u32, u32)> = (0..33).map(|i| (i * 2, 1, 0)).collect();
    refused(IOERR, |d| d.segments(VIRTIO_BLK_T_WRITE_ZEROES, &segs));
}

#[test]
fn length_not_multiple_of_512_is_ioerr() {
    for len in [1, 511, 513, 1000] {
        read_and_write_refused(0, len, 2);
    }
}

#[test]
fn guest_address_outside_memory_is_ioerr() {
    for addr in [MEM_SIZE, MEM_SIZE - 256, u64::MAX - 100] {
        refused(IOERR, |d| {
            d.request_with(VIRTIO_BLK_T_IN, 0, addr, &[w(addr, 512)])
        });
        refused(IOERR, |d| {
            d.request_with(VIRTIO_BLK_T_OUT, 0, addr, &[r(addr, 512)])
        });
    }
}

#[test]
fn status_outside_memory_is_dropped() {
    for addr in [MEM_SIZE, u64::MAX, u64::MAX - 1] {
        let (mut b, gm) = Backend::new(false);
        let mut d = b.driver(&gm);
        let io = with_neighbours(&mut d, &mut b, |d| {
            let h = d.header(VIRTIO_BLK_T_FLUSH, 0);
            let head = d.add(&[r(h, 16), w(addr, 1)]);
            Io {
                head,
                data: 0,
                status: addr,
            }
        });
        assert_eq!(d.used().get(&io.head), Some(&0));
    }
}

#[test]
fn unknown_request_type_is_unsupp() {
    let b = refused(UNSUPP, |d| d.bare(0x99, 0));
    assert_eq!(b.dev.counters().unsupp, 1);
    // With data in both directions too.
    refused(UNSUPP, |d| {
        let out = d.buf(&[1; 64]);
        let inb = d.alloc(64);
        d.request_with(0x99, 0, inb, &[r(out, 64), w(inb, 64)])
    });
}

#[test]
fn discard_with_unmap_flag_is_unsupp() {
    refused(UNSUPP, |d| {
        d.segments(
            VIRTIO_BLK_T_DISCARD,
            &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        )
    });
    // Unknown segment flags on WRITE_ZEROES.
    refused(UNSUPP, |d| {
        d.segments(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0x2)])
    });
}

#[test]
fn read_only_device_refuses_writes() {
    let (mut b, gm) = Backend::new(true);
    let mut d = b.driver(&gm);
    let wr = d.write(0, &pattern(4, 512));
    let ds = d.segments(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]);
    let wz = d.segments(VIRTIO_BLK_T_WRITE_ZEROES, &[(8, 8, 0)]);
    let rd = d.read(0, 4096);
    let fl = d.bare(VIRTIO_BLK_T_FLUSH, 0);
    let id = d.get_id(20);
    b.run();
    d.expect(&wr, IOERR, 1);
    d.expect(&ds, IOERR, 1);
    d.expect(&wz, IOERR, 1);
    d.expect(&rd, OK, 4097);
    assert_eq!(d.bytes(rd.data, 4096), image_bytes(0, 4096));
    d.expect(&fl, OK, 1);
    d.expect(&id, OK, 21);
    assert_eq!(b.image(), image_bytes(0, IMAGE_SIZE as usize));
    assert_eq!(b.dev.counters().ioerr, 3);
}

#[test]
fn chain_longer_than_4gib_is_not_ok() {
    // 513 device-writable descriptors of 8 MiB each over the same guest
    // range: 4 GiB + 512 bytes of READ data, which virtio 1.2 §2.7.5.2
    // forbids. virtio-queue stops the chain at 2^32 bytes, so the parser
    // sees a truncated chain whose last byte is inside the data; whatever
    // happens, it must not be a successful READ, and not a panic.
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let io = with_neighbours(&mut d, &mut b, |d| {
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let s = d.status();
        let mut descs = vec![r(h, 16)];
        descs.extend((0..512).map(|_| w(BUF_END, 0x80_0000)));
        descs.push(w(BUF_END, 512));
        descs.push(w(s, 1));
        let head = d.add_indirect(&descs);
        Io {
            head,
            data: BUF_END,
            status: s,
        }
    });
    let used = d.used()[&io.head];
    assert!(used <= 1, "used length {used}");
    assert_ne!(d.status_of(&io), OK);
    assert_eq!(b.image(), {
        let mut want = image_bytes(0, IMAGE_SIZE as usize);
        want[200 * 512..201 * 512].copy_from_slice(&pattern(0x40, 512));
        want
    });
}

#[test]
fn chain_of_exactly_4gib_completes_with_length_0_and_touches_no_byte() {
    // Issue 13 findings 6 and 7: 16 + 512 x 8 MiB - 17 + 1 bytes = 2^32.
    // virtio-queue never yields the status descriptor; the chain is
    // completed (used length 0, counted as dropped) and neither the status
    // byte nor the last data byte seen is written.
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let h = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status();
    let mut descs = vec![r(h, 16)];
    descs.extend((0..511).map(|_| w(BUF_END, 0x80_0000)));
    descs.push(w(BUF_END, 0x80_0000 - 17));
    descs.push(w(s, 1));
    let head = d.add_indirect(&descs);
    let io = Io {
        head,
        data: BUF_END,
        status: s,
    };
    let before = d.bytes(BUF_END, 0x80_0000);
    b.run();
    assert_eq!(d.used()[&io.head], 0);
    assert_eq!(d.status_of(&io), UNSET, "no status byte is known");
    assert_eq!(d.bytes(BUF_END, 0x80_0000), before, "no data byte written");
    assert_eq!(b.dev.counters().dropped, 1);
    // The queue goes on.
    let ok = d.read(8, 4096);
    b.run();
    d.expect(&ok, OK, 4097);
}

#[test]
fn read_over_the_largest_transfer_is_ioerr() {
    // 33 descriptors of 1 MiB over one guest MiB: 33 MiB, over the 32 MiB
    // largest transfer (size_max x seg_max offered): IOERR, no I/O.
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    let h = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status();
    let mut descs = vec![r(h, 16)];
    descs.extend((0..33).map(|_| w(BUF_END, 1 << 20)));
    descs.push(w(s, 1));
    let head = d.add_indirect(&descs);
    let io = Io {
        head,
        data: BUF_END,
        status: s,
    };
    b.run();
    d.expect(&io, IOERR, 1);
    assert_eq!(b.dev.counters().bytes_read, 0);
}

/// EVENT_IDX on, and the avail index moved more than the queue size ahead
/// (a hostile driver): no chain can be popped, yet the index differs from
/// where the device stopped. The kick must return (it used to spin forever
/// under the worker's lock, which also blocked GET_VRING_BASE), and a good
/// request made available afterwards, with a sane index, is served.
#[test]
fn avail_index_far_ahead_under_event_idx_does_not_spin() {
    let (mut b, gm) = Backend::new(false);
    let mut d = b.driver(&gm);
    b.vring.set_queue_event_idx(true);
    b.worker.set_event_idx(true);
    d.set_avail_idx(QSIZE + 5);
    // On its own thread, so that a regression fails the test instead of
    // hanging it (the spinning thread is left behind).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = b;
        b.worker.process_queue(&b.vring);
        let _ = tx.send(b);
    });
    let mut b = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("process_queue spun on an avail index it cannot pop");
    d.set_avail_idx(0);
    let io = d.read(8, 4096);
    b.run();
    d.expect(&io, OK, 4097);
}

/// Issue 13 finding 5 at the worker: guest memory is a memfd (as a frontend
/// gives it), cut short under pending requests. With `--bounce always` a
/// WRITE's data is copied by the CPU (SIGBUS, absorbed by `crate::sigbus`);
/// a READ into the cut part fails too; requests below the cut are served.
#[test]
fn requests_on_guest_memory_cut_short_fail_and_the_queue_goes_on() {
    use std::os::fd::FromRawFd;
    use vm_memory::{
        FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
        GuestRegionMmap,
    };
    // SAFETY: memfd_create with a NUL-terminated name; the fd is checked.
    let fd = unsafe { libc::memfd_create(c"pinblk-worker-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).unwrap();
    let region = GuestRegionMmap::from_range(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )
    .unwrap();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_regions(vec![region]).unwrap());
    crate::sigbus::accept_memory(&mem).unwrap();
    let gm = mem.memory().into_inner();
    let dir = tempfile::tempdir().unwrap();
    let (path, image) = image_file(dir.path(), false);
    let parts = crate::device::DeviceParts {
        policy: crate::pin::policy::PolicyConfig {
            bounce_always: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let dev = Arc::new(super::test_util::device_with(
        image, 1, false, SERIAL, parts,
    ));
    let vring = vring(&mem);
    let worker = QueueWorker::new(dev.clone(), mem, 0).unwrap();
    let mut b = Backend {
        _dir: dir,
        path,
        dev,
        gm: gm.clone(),
        vring,
        worker,
    };
    let mut d = b.driver(&gm);
    let before = d.write(8, &pattern(1, 4096));
    b.run();
    d.expect(&before, OK, 1);
    // Rings, headers and status bytes stay below 8 MiB; data at 12 MiB.
    let cut = 0xC0_0000;
    super::test_util::fill(&gm, cut, &pattern(2, 8192));
    file.set_len(BUF_END).unwrap();
    let write = d.request_with(VIRTIO_BLK_T_OUT, 16, cut, &[r(cut, 4096)]);
    let read = d.request_with(VIRTIO_BLK_T_IN, 24, cut + 4096, &[w(cut + 4096, 4096)]);
    let after = d.read(8, 4096);
    b.run();
    d.expect(&write, IOERR, 1);
    d.expect(&read, IOERR, 1);
    d.expect(&after, OK, 4097);
    assert_eq!(d.bytes(after.data, 4096), pattern(1, 4096));
    assert_eq!(
        b.image()[16 * 512..17 * 512],
        image_bytes(16 * 512, 512)[..]
    );
    assert!(crate::sigbus::faults() > 0);
}
