//! Unit tests of the integrity layer.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;

/// A temporary image file with pseudo-random content.
struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
    file: File,
}

impl Img {
    fn new(size: u64, seed: u64) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&pattern(size as usize, seed), 0).unwrap();
        Img {
            _dir: dir,
            path,
            file,
        }
    }

    fn store_path(&self) -> PathBuf {
        default_store_path(&self.path)
    }

    fn write(&self, off: u64, data: &[u8]) {
        self.file.write_all_at(data, off).unwrap();
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.file.read_exact_at(&mut b, off).unwrap();
        b
    }

    fn read_rest(&self) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |off, buf| self.file.read_exact_at(buf, off)
    }

    fn open(&self) -> (ChecksumStore, OpenOutcome) {
        ChecksumStore::open(&self.path, &StoreOptions::default()).unwrap()
    }

    fn open_err(&self, opts: &StoreOptions) -> IntegrityError {
        ChecksumStore::open(&self.path, opts).unwrap_err()
    }

    /// Every block of the image verifies against `store`.
    fn assert_consistent(&self, store: &ChecksumStore) {
        let data = self.read(0, store.image_size() as usize);
        assert_eq!(store.verify(0, &[&data]).unwrap(), vec![]);
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn crc_helpers() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    let a = pattern(5000, 1);
    let (x, y) = a.split_at(1234);
    let (y, z) = y.split_at(7);
    assert_eq!(crc32c_slices([x, y, z]), crc32c(&a));
    assert_eq!(crc32c_append(crc32c(x), &a[1234..]), crc32c(&a));
    assert_eq!(crc_of_zero_block(), crc32c(&[0u8; 4096]));
    assert_eq!(crc_of_zeros(1024), crc32c(&[0u8; 1024]));
    assert_eq!(hex_crc(0xab), "0x000000ab");
    assert_eq!(
        default_store_path(Path::new("/a/b.img")),
        Path::new("/a/b.img.pinsum")
    );
}

#[test]
fn create_from_existing_image_and_sparse_holes() {
    let img = Img::new(6 * 4096, 2);
    // A hole in the middle: 2 MiB of sparse zeros after the data.
    img.file.set_len(6 * 4096 + (2 << 20)).unwrap();
    let (store, out) = img.open();
    assert!(out.created && !out.unclean && out.recovered.is_empty());
    assert_eq!(out.generation, 1);
    assert_eq!(store.block_count(), 6 + 512);
    for b in 0..6 {
        assert_eq!(
            store.expected(b),
            Some(crc32c(&img.read(b * 4096, 4096))),
            "block {b}"
        );
    }
    assert_eq!(store.expected(6 + 300), Some(crc_of_zero_block()));
    assert_eq!(store.expected(6 + 512), None);
    img.assert_consistent(&store);
    store.close().unwrap();
    let (_store, out) = img.open();
    assert!(!out.created && !out.unclean);
    assert_eq!(out.generation, 2);
}

#[test]
fn whole_block_writes_and_partial_refused() {
    let img = Img::new(8 * 4096, 3);
    let (store, _) = img.open();
    let data = pattern(2 * 4096, 30);
    // Scatter list with an odd split that crosses the block boundary.
    let (a, b) = data.split_at(4097);
    store.record_write(4096, &[a, b]).unwrap();
    img.write(4096, &data);
    assert_eq!(store.expected(1), Some(crc32c(&data[..4096])));
    assert_eq!(store.expected(2), Some(crc32c(&data[4096..])));
    img.assert_consistent(&store);

    // Partial blocks need the rest: refused, and nothing recorded.
    let before: Vec<_> = (0..8).map(|b| store.expected(b)).collect();
    for (off, len) in [(512u64, 512usize), (4096, 4096 + 512), (3584, 4096)] {
        let e = store.record_write(off, &[&pattern(len, 4)]).unwrap_err();
        assert!(matches!(e, IntegrityError::PartialBlock { .. }), "{e}");
        assert!(e.to_string().contains("record_write_with"));
    }
    assert_eq!(
        before,
        (0..8).map(|b| store.expected(b)).collect::<Vec<_>>()
    );
    let e = store.record_write(7 * 4096, &[&[0u8; 8192]]).unwrap_err();
    assert!(matches!(e, IntegrityError::OutOfRange { .. }), "{e}");
    store.record_write(0, &[]).unwrap();
}

#[test]
fn partial_and_unaligned_writes() {
    let img = Img::new(8 * 4096, 5);
    let (store, _) = img.open();
    // 512-byte writes into one 4 KiB block (512-byte logical block size),
    // writes straddling blocks, and byte-unaligned ones.
    let cases: &[(u64, usize)] = &[
        (4096 + 1024, 512),
        (4096, 512),
        (8192 - 512, 512),
        (8192 - 512, 1024),
        (3 * 4096 - 1536, 2 * 4096 + 3072),
        (100, 9000),
        (5 * 4096 + 7, 1),
        (0, 8 * 4096),
        (7 * 4096 + 4095, 1),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(len, 100 + i as u64);
        let (x, y) = data.split_at(len / 3);
        store
            .record_write_with(off, &[x, y], img.read_rest())
            .unwrap();
        img.write(off, &data);
        img.assert_consistent(&store);
        // The same write verified back, with the partial edges read from the image.
        assert_eq!(
            store.verify_with(off, &[&data], img.read_rest()).unwrap(),
            vec![],
            "case {i}"
        );
    }
}

#[test]
fn short_last_block() {
    // 10 sectors: block 1 is 1024 bytes long.
    let img = Img::new(10 * 512, 6);
    let (store, _) = img.open();
    assert_eq!(store.block_count(), 2);
    assert_eq!(store.block_len(1), 1024);
    assert_eq!(store.expected(1), Some(crc32c(&img.read(4096, 1024))));
    // A write to the whole tail is a whole block.
    let d = pattern(1024, 7);
    store.record_write(4096, &[&d]).unwrap();
    img.write(4096, &d);
    store
        .record_write_with(4096 + 512, &[&d[..512]], img.read_rest())
        .unwrap();
    img.write(4096 + 512, &d[..512]);
    img.assert_consistent(&store);
    store.record_zero(4096, 1024).unwrap();
    assert_eq!(store.expected(1), Some(crc32c(&[0u8; 1024])));
}

#[test]
fn zeroes_and_discard() {
    let img = Img::new(8 * 4096, 8);
    let (store, _) = img.open();
    store.record_zero(2 * 4096, 3 * 4096).unwrap();
    for b in 2..5 {
        assert_eq!(store.expected(b), Some(crc_of_zero_block()));
    }
    assert!(matches!(
        store.record_zero(512, 4096),
        Err(IntegrityError::PartialBlock { .. })
    ));
    img.write(2 * 4096, &[0u8; 3 * 4096]);
    // Partial zeroing of blocks 5..7.
    let (off, len) = (5 * 4096 + 1536, 4096 + 512);
    store.record_zero_with(off, len, img.read_rest()).unwrap();
    img.write(off, &vec![0u8; len as usize]);
    img.assert_consistent(&store);
}

#[test]
fn verify_finds_mismatches_and_skips_partial_edges() {
    let img = Img::new(8 * 4096, 9);
    let (store, _) = img.open();
    let mut data = img.read(0, 8 * 4096);
    data[3 * 4096 + 17] ^= 1;
    let m = store.verify(0, &[&data]).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].block, m[0].sector()), (3, 24));
    assert_eq!(m[0].expected, store.expected(3).unwrap());
    assert_eq!(m[0].found, crc32c(&data[3 * 4096..4 * 4096]));
    // A read covering only part of block 3 cannot see the flip without the rest…
    let part = &data[3 * 4096..3 * 4096 + 1024];
    assert_eq!(store.verify(3 * 4096, &[part]).unwrap(), vec![]);
    // …and with the rest read from the image it does.
    let m = store
        .verify_with(3 * 4096, &[part], img.read_rest())
        .unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].block, 3);
    // A read straddling blocks 2..4, edges partial: block 3 is whole and checked.
    let r = &data[2 * 4096 + 512..4 * 4096 + 512];
    assert_eq!(store.verify(2 * 4096 + 512, &[r]).unwrap().len(), 1);
}

#[test]
fn concurrent_writers_on_different_blocks() {
    let img = Img::new(64 * 4096, 10);
    let (store, _) = img.open();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (store, img) = (&store, &img);
            s.spawn(move || {
                for b in (t..64).step_by(4) {
                    let d = pattern(4096, 1000 + b);
                    store.record_write(b * 4096, &[&d]).unwrap();
                    img.write(b * 4096, &d);
                }
            });
        }
    });
    img.assert_consistent(&store);
    store.flush().unwrap();
    drop(store);
    let (store, out) = img.open();
    assert!(out.unclean);
    assert_eq!(out.recovered, vec![]);
    img.assert_consistent(&store);
}

fn rewrite_header(store: &Path, f: impl FnOnce(&mut [u8]), fix_crc: bool) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(store)
        .unwrap();
    let mut h = vec![0u8; 4096];
    file.read_exact_at(&mut h, 0).unwrap();
    f(&mut h);
    if fix_crc {
        h[48..52].fill(0);
        let c = crc32c(&h);
        h[48..52].copy_from_slice(&c.to_le_bytes());
    }
    file.write_all_at(&h, 0).unwrap();
}

#[test]
fn header_mismatches_are_refused_never_rebuilt() {
    let img = Img::new(16 * 4096, 11);
    let (store, _) = img.open();
    store.close().unwrap();
    let sp = img.store_path();
    let pristine = std::fs::read(&sp).unwrap();
    let restore = || std::fs::write(&sp, &pristine).unwrap();
    let opts = StoreOptions::default();

    type Check = fn(&IntegrityError) -> bool;
    type Mutate = Box<dyn Fn(&mut [u8])>;
    let cases: Vec<(&str, Mutate, bool, Check, &str)> = vec![
        (
            "magic",
            Box::new(|h| h[0..8].copy_from_slice(b"NOTASTOR")),
            true,
            |e| matches!(e, IntegrityError::NotAStore { .. }),
            "not a pinblk checksum store",
        ),
        (
            "version",
            Box::new(|h| h[8..12].copy_from_slice(&2u32.to_le_bytes())),
            true,
            |e| matches!(e, IntegrityError::UnsupportedVersion { found: 2, .. }),
            "format version 2",
        ),
        (
            "block size",
            Box::new(|h| h[12..16].copy_from_slice(&512u32.to_le_bytes())),
            true,
            |e| matches!(e, IntegrityError::BlockSizeMismatch { found: 512, .. }),
            "block size 512 bytes",
        ),
        (
            "algorithm",
            Box::new(|h| h[16..20].copy_from_slice(&7u32.to_le_bytes())),
            true,
            |e| matches!(e, IntegrityError::AlgorithmMismatch { found: 7, .. }),
            "algorithm id 7",
        ),
        (
            "image size",
            Box::new(|h| h[24..32].copy_from_slice(&(15u64 * 4096).to_le_bytes())),
            true,
            |e| matches!(e, IntegrityError::BlockCountMismatch { .. }),
            "16 blocks for an image of 61440 bytes",
        ),
        (
            "block count",
            Box::new(|h| h[32..40].copy_from_slice(&17u64.to_le_bytes())),
            true,
            |e| {
                matches!(
                    e,
                    IntegrityError::BlockCountMismatch {
                        block_count: 17,
                        ..
                    }
                )
            },
            "header is corrupt",
        ),
        (
            "header crc",
            Box::new(|h| h[44] ^= 0x40),
            false,
            |e| matches!(e, IntegrityError::HeaderCorrupt { .. }),
            "corrupt header",
        ),
        (
            "reserved byte",
            Box::new(|h| h[4000] = 1),
            false,
            |e| matches!(e, IntegrityError::HeaderCorrupt { .. }),
            "corrupt header",
        ),
    ];
    for (name, mutate, fix, check, text) in cases {
        restore();
        rewrite_header(&sp, mutate, fix);
        let before = std::fs::read(&sp).unwrap();
        let e = img.open_err(&opts);
        let msg = e.to_string();
        assert!(check(&e), "{name}: {msg}");
        assert!(msg.contains(text), "{name}: {msg}");
        assert!(
            msg.contains("remove the store to rebuild it from the image, or pass --checksum off"),
            "{name}: {msg}"
        );
        assert_eq!(std::fs::read(&sp).unwrap(), before, "{name}: store changed");
    }

    // The image was resized: the store covers another size.
    restore();
    img.file.set_len(17 * 4096).unwrap();
    let e = img.open_err(&opts);
    assert!(
        matches!(
            e,
            IntegrityError::ImageSizeMismatch {
                store_size: 65536,
                image_size: 69632,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("resized"), "{e}");
    img.file.set_len(16 * 4096).unwrap();

    // And the pristine store still opens.
    restore();
    img.open().0.close().unwrap();
}

#[test]
fn corrupt_store_refused() {
    let img = Img::new(16 * 4096, 12);
    img.open().0.close().unwrap();
    let sp = img.store_path();
    let pristine = std::fs::read(&sp).unwrap();
    let opts = StoreOptions::default();

    // A flipped table entry in a cleanly closed store.
    let mut t = pristine.clone();
    t[4096 + 4 * 5 + 1] ^= 0x10;
    std::fs::write(&sp, &t).unwrap();
    let e = img.open_err(&opts);
    assert!(matches!(e, IntegrityError::TableCorrupt { .. }), "{e}");
    assert!(e.to_string().contains("corrupt checksum table"), "{e}");

    // Truncated table, truncated header, extended file, empty file.
    for len in [pristine.len() - 4, 100, 0] {
        std::fs::write(&sp, &pristine[..len]).unwrap();
        let e = img.open_err(&opts);
        assert!(
            matches!(
                e,
                IntegrityError::LengthMismatch { .. } | IntegrityError::NotAStore { .. }
            ),
            "len {len}: {e}"
        );
        assert_eq!(std::fs::read(&sp).unwrap().len(), len, "never rebuilt");
    }
    let mut long = pristine.clone();
    long.extend_from_slice(&[0; 4]);
    std::fs::write(&sp, &long).unwrap();
    assert!(matches!(
        img.open_err(&opts),
        IntegrityError::LengthMismatch { .. }
    ));

    // A store of another image size given explicitly.
    std::fs::write(&sp, &pristine).unwrap();
    let e = img.open_err(&StoreOptions {
        image_size: Some(8 * 4096),
        ..StoreOptions::default()
    });
    assert!(matches!(e, IntegrityError::ImageSizeMismatch { .. }), "{e}");
}

#[test]
fn second_open_is_refused_while_in_use() {
    let img = Img::new(4 * 4096, 13);
    let (store, _) = img.open();
    assert!(matches!(
        img.open_err(&StoreOptions::default()),
        IntegrityError::InUse(_)
    ));
    assert!(matches!(
        scrub(&img.path, &img.store_path(), |_, _| {}),
        Err(IntegrityError::InUse(_))
    ));
    store.close().unwrap();
    let ro = StoreOptions {
        read_only: true,
        ..StoreOptions::default()
    };
    let (ro_store, _) = ChecksumStore::open(&img.path, &ro).unwrap();
    assert!(matches!(
        ro_store.record_write(0, &[&[0u8; 4096]]),
        Err(IntegrityError::ReadOnly(_))
    ));
    assert!(ro_store.flush().is_err());
}

fn header_state(store: &Path) -> u32 {
    let h = std::fs::read(store).unwrap();
    u32::from_le_bytes(h[20..24].try_into().unwrap())
}

fn stored_entry(store: &Path, block: u64) -> u32 {
    let f = File::open(store).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, HEADER_SIZE + 4 * block).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn flush_is_durable() {
    let img = Img::new(32 * 4096, 14);
    let sp = img.store_path();
    let (store, _) = img.open();
    assert_eq!(header_state(&sp), 1, "in use while open");
    let d = pattern(3 * 4096, 140);
    store.record_write(10 * 4096, &[&d]).unwrap();
    img.write(10 * 4096, &d);
    // Not yet flushed: the file still has the old entry.
    assert_ne!(stored_entry(&sp, 11), crc32c(&d[4096..8192]));
    img.file.sync_data().unwrap();
    store.flush().unwrap();
    // Another reader of the file sees the new checksums.
    for i in 0..3 {
        assert_eq!(
            stored_entry(&sp, 10 + i),
            crc32c(&d[i as usize * 4096..][..4096])
        );
    }
    // Crash right after the flush: a new instance sees them and has nothing to recover.
    drop(store);
    let (store, out) = img.open();
    assert!(out.unclean);
    assert_eq!(out.recovered, vec![]);
    assert_eq!(store.expected(11), Some(crc32c(&d[4096..8192])));
    store.close().unwrap();
    assert_eq!(header_state(&sp), 0, "clean after close");
}

#[test]
fn unclean_shutdown_recovery() {
    let img = Img::new(32 * 4096, 15);
    let (store, _) = img.open();
    // Flushed state.
    let a = pattern(4096, 150);
    store.record_write(0, &[&a]).unwrap();
    img.write(0, &a);
    store.flush().unwrap();
    // Before the next flush: a write recorded whose data landed (block 1),
    // one recorded whose data never landed (block 2: its checksum is flushed
    // before its data, as for a write still in flight at a FLUSH), a partial
    // write recorded and landed (block 3), a write flushed (block 4).
    let b = pattern(4096, 151);
    store.record_write(4096, &[&b]).unwrap();
    img.write(4096, &b);
    let c = pattern(4096, 152);
    store.record_write(2 * 4096, &[&c]).unwrap();
    let p = pattern(512, 153);
    store
        .record_write_with(3 * 4096 + 512, &[&p], img.read_rest())
        .unwrap();
    img.write(3 * 4096 + 512, &p);
    let d = pattern(4096, 154);
    store.record_write(4 * 4096, &[&d]).unwrap();
    img.write(4 * 4096, &d);
    store.flush().unwrap();
    // After the last flush: an overwrite of block 4 torn by the crash (half
    // landed), a write that landed but whose checksum was never flushed
    // (block 5), and one recorded that never landed (block 6).
    let d2 = pattern(4096, 155);
    store.record_write(4 * 4096, &[&d2]).unwrap();
    img.write(4 * 4096, &d2[..2048]);
    let e = pattern(4096, 156);
    store.record_write(5 * 4096, &[&e]).unwrap();
    img.write(5 * 4096, &e);
    store
        .record_write(6 * 4096, &[&pattern(4096, 157)])
        .unwrap();
    // kill -9: no close.
    drop(store);

    let (store, out) = img.open();
    assert!(out.unclean && !out.created);
    let blocks: Vec<u64> = out.recovered.iter().map(|r| r.block).collect();
    assert_eq!(blocks, vec![2, 4, 5]);
    let r2 = out.recovered[0];
    assert_eq!(r2.stored, crc32c(&c));
    assert_eq!(r2.found, crc32c(&img.read(2 * 4096, 4096)));
    let r4 = out.recovered[1];
    assert_eq!(r4.stored, crc32c(&d));
    assert_eq!(r4.found, crc32c(&img.read(4 * 4096, 4096)));
    assert_eq!(r4.sector(), 32);
    assert_eq!(out.recovered[2].found, crc32c(&e));
    img.assert_consistent(&store);
    // Recovery was made durable: scrub after close is clean, next open clean.
    store.close().unwrap();
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(rep.ok() && rep.store_clean, "{rep}");
    let (_s, out) = img.open();
    assert!(!out.unclean && out.recovered.is_empty());
}

#[test]
fn crash_at_random_points_leaves_nothing_unrecovered() {
    // Random sequences of writes (whole, partial, zeroes), flushes and
    // "landed or not" decisions, then a crash: after reopening, the image
    // must verify completely.
    let mut rng = 0x1234_5678_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..20 {
        let img = Img::new(16 * 4096, 200 + round);
        let (store, _) = img.open();
        for _ in 0..40 {
            let off = next(16 * 8) * 512;
            let len = ((next(12) + 1) * 512).min(16 * 4096 - off);
            let data = pattern(len as usize, next(1 << 30));
            match next(4) {
                0 => {
                    store.record_zero_with(off, len, img.read_rest()).unwrap();
                    if next(2) == 0 {
                        img.write(off, &vec![0; len as usize]);
                    }
                }
                1 => store.flush().unwrap(),
                _ => {
                    store
                        .record_write_with(off, &[&data], img.read_rest())
                        .unwrap();
                    // Landed fully, partly, or not at all.
                    match next(3) {
                        0 => img.write(off, &data),
                        1 => img.write(off, &data[..data.len() / 2]),
                        _ => {}
                    }
                }
            }
        }
        drop(store);
        let (store, out) = img.open();
        assert!(out.unclean);
        img.assert_consistent(&store);
        store.close().unwrap();
        assert!(scrub(&img.path, &img.store_path(), |_, _| {}).unwrap().ok());
    }
}

#[test]
fn scrub_finds_block_changed_behind_its_back() {
    let img = Img::new(300 * 4096, 16);
    let (store, _) = img.open();
    store.close().unwrap();
    let mut last = (0, 0);
    let rep = scrub(&img.path, &img.store_path(), |d, t| last = (d, t)).unwrap();
    assert!(rep.ok() && rep.store_clean);
    assert_eq!(last, (300, 300));
    assert_eq!(rep.blocks, 300);

    let old = img.read(257 * 4096, 4096);
    img.write(257 * 4096 + 100, b"scribble");
    let new = img.read(257 * 4096, 4096);
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(!rep.ok());
    assert_eq!(
        rep.mismatches,
        vec![ScrubMismatch {
            block: 257,
            sector: 257 * 8,
            expected: crc32c(&old),
            found: crc32c(&new),
        }]
    );
    let text = rep.to_string();
    assert!(
        text.contains("checksum failed at sector 0x808 (block 257)"),
        "{text}"
    );
    assert!(text.contains("1 mismatch"), "{text}");
    // Scrub is read-only: the store is unchanged and a writable open of a
    // clean store does not "recover" the change (it is a real failure).
    let (store, out) = img.open();
    assert!(out.recovered.is_empty());
    assert_eq!(store.verify(257 * 4096, &[&new]).unwrap().len(), 1);
}

#[test]
fn scrub_reports_unclean_store() {
    let img = Img::new(4 * 4096, 17);
    let (store, _) = img.open();
    store.record_write(0, &[&[7u8; 4096]]).unwrap();
    img.write(0, &[7u8; 4096]);
    drop(store);
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(!rep.store_clean);
    assert_eq!(rep.mismatches.len(), 1);
    assert!(rep.to_string().contains("NOT closed cleanly"));
    // Scrub without a store.
    let e = scrub(&img.path, &img.path.with_extension("nope"), |_, _| {}).unwrap_err();
    assert!(matches!(e, IntegrityError::StoreMissing(_)), "{e}");
}

/// Measures the cost of checksumming: run with
/// `cargo test --release --lib integrity::tests::bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_checksum_cost() {
    let block = pattern(4096, 42);
    let n = 2_000_000u32;
    let mut acc = 0u32;
    let t = Instant::now();
    for i in 0..n {
        acc ^= crc32c(std::hint::black_box(&block)).wrapping_add(i);
    }
    let crc_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    std::hint::black_box(acc);

    let img = Img::new(1024 * 4096, 43);
    let (store, _) = img.open();
    let n2 = 1_000_000u64;
    let t = Instant::now();
    for i in 0..n2 {
        store.record_write((i % 1024) * 4096, &[&block]).unwrap();
    }
    let rec_ns = t.elapsed().as_nanos() as f64 / n2 as f64;
    let t = Instant::now();
    for i in 0..n2 {
        std::hint::black_box(store.verify((i % 1024) * 4096, &[&block]).unwrap());
    }
    let ver_ns = t.elapsed().as_nanos() as f64 / n2 as f64;
    let t = Instant::now();
    let part = &block[..512];
    for i in 0..n2 / 10 {
        store
            .record_write_with((i % 1024) * 4096 + 512, &[part], img.read_rest())
            .unwrap();
    }
    let part_ns = t.elapsed().as_nanos() as f64 / (n2 / 10) as f64;
    let big = pattern(1 << 20, 44);
    let t = Instant::now();
    for _ in 0..2000 {
        std::hint::black_box(crc32c(std::hint::black_box(&big)));
    }
    let gbps = (2000.0 * (1 << 20) as f64) / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    for _ in 0..1000 {
        store.record_write(0, &[&block]).unwrap();
        store.flush().unwrap();
    }
    let flush_us = t.elapsed().as_secs_f64() * 1e6 / 1000.0;
    drop(store);
    // Full-scan recovery of a 64 MiB non-sparse image (page cache warm).
    let big_img = Img::new(64 << 20, 45);
    let (s, _) = big_img.open();
    drop(s);
    let t = Instant::now();
    let (_s, out) = big_img.open();
    assert!(out.unclean);
    let scan_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("full-scan recovery of 64 MiB after an unclean shutdown: {scan_ms:.1} ms");
    println!(
        "crc32c(4 KiB): {crc_ns:.0} ns; record_write(4 KiB): {rec_ns:.0} ns; verify(4 KiB): {ver_ns:.0} ns; \
         record_write_with(512 B, read rest via pread): {part_ns:.0} ns; crc32c throughput {gbps:.1} GB/s; \
         record+flush (pwrite+fdatasync of the store): {flush_us:.1} us"
    );
}
