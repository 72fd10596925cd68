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
fn verify_crcs_compares_whole_blocks_and_refuses_a_short_last_block() {
    // 8 whole blocks and a 512-byte ninth.
    let img = Img::new(8 * 4096 + 512, 11);
    let (store, _) = img.open();
    let data = img.read(0, 8 * 4096);
    let mut crcs: Vec<u32> = data.chunks(4096).map(crc32c).collect();
    assert_eq!(store.verify_crcs(0, &crcs).unwrap(), vec![]);
    crcs[5] ^= 1;
    let m = store.verify_crcs(2, &crcs[2..7]).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].block, m[0].found), (5, crcs[5]));
    assert_eq!(m[0].expected, store.expected(5).unwrap());
    // The same answer as verifying the data itself.
    let mut flipped = data.clone();
    flipped[5 * 4096] ^= 0x80;
    assert_eq!(store.verify(0, &[&flipped]).unwrap()[0].block, 5);
    // Block 8 is 512 bytes: no whole-block CRC can describe it.
    assert!(store.verify_crcs(8, &[0]).is_err());
    assert!(store.verify_crcs(7, &[0, 0]).is_err());
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
            Box::new(|h| h[8..12].copy_from_slice(&3u32.to_le_bytes())),
            true,
            |e| matches!(e, IntegrityError::UnsupportedVersion { found: 3, .. }),
            "format version 3",
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
            "region size",
            Box::new(|h| h[56..64].copy_from_slice(&3000u64.to_le_bytes())),
            true,
            |e| {
                matches!(
                    e,
                    IntegrityError::LayoutMismatch {
                        field: "region_size",
                        found: 3000,
                        ..
                    }
                )
            },
            "region_size is 3000, expected a power of two from 4096 to 1 GiB",
        ),
        (
            "region count",
            Box::new(|h| h[64..72].copy_from_slice(&2u64.to_le_bytes())),
            true,
            |e| {
                matches!(
                    e,
                    IntegrityError::LayoutMismatch {
                        field: "region_count",
                        ..
                    }
                )
            },
            "region_count is 2, expected 1",
        ),
        (
            "table offset",
            Box::new(|h| h[88..96].copy_from_slice(&4096u64.to_le_bytes())),
            true,
            |e| {
                matches!(
                    e,
                    IntegrityError::LayoutMismatch {
                        field: "table_offset",
                        ..
                    }
                )
            },
            "table_offset is 4096, expected 8192",
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
    t[2 * 4096 + 4 * 5 + 1] ^= 0x10;
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
        identity: None,
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

/// The u64 header field at byte `off` of the store file.
fn header_u64(store: &Path, off: usize) -> u64 {
    let h = std::fs::read(store).unwrap();
    u64::from_le_bytes(h[off..off + 8].try_into().unwrap())
}

/// Block `block`'s entry as read from the file (not through the store).
fn stored_entry(store: &Path, block: u64) -> u32 {
    let table_offset = header_u64(store, 88);
    let f = File::open(store).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, table_offset + 4 * block).unwrap();
    u32::from_le_bytes(b)
}

/// Region `region`'s bit as read from the file.
fn stored_bit(store: &Path, region: u64) -> bool {
    let bitmap_offset = header_u64(store, 72);
    let f = File::open(store).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, bitmap_offset + region / 8).unwrap();
    b[0] & (1 << (region % 8)) != 0
}

const MIB: u64 = 1 << 20;

/// A FLUSH as the data path serves it: ticket at submission, image then
/// store fdatasync, then flush_end.
fn flush(img: &Img, store: &ChecksumStore) {
    let t = store.flush_begin();
    img.file.sync_data().unwrap();
    store.flush().unwrap();
    store.flush_end(t);
}

/// A WRITE of whole blocks that completes, as the data path does it:
/// intent, checksums, data, end.
fn complete_write(img: &Img, store: &ChecksumStore, off: u64, data: &[u8]) {
    let len = data.len() as u64;
    store.intent_begin(off, len).unwrap();
    store.record_write(off, &[data]).unwrap();
    img.write(off, data);
    store.intent_end(off, len);
}

#[test]
fn checksums_reach_the_file_at_once_and_flush_makes_them_durable() {
    let img = Img::new(32 * 4096, 14);
    let sp = img.store_path();
    let (store, _) = img.open();
    assert_eq!(header_state(&sp), 1, "in use while open");
    let d = pattern(3 * 4096, 140);
    complete_write(&img, &store, 10 * 4096, &d);
    // Mapped: another reader of the file sees the new checksums and the
    // region's bit before any flush.
    for i in 0..3 {
        assert_eq!(
            stored_entry(&sp, 10 + i),
            crc32c(&d[i as usize * 4096..][..4096])
        );
    }
    assert!(store.region_marked(0) && stored_bit(&sp, 0));
    flush(&img, &store);
    assert!(!store.region_marked(0) && !stored_bit(&sp, 0));
    // Crash right after the flush: nothing marked, nothing to recover.
    drop(store);
    let (store, out) = img.open();
    assert!(out.unclean);
    assert_eq!(out.marked_regions, 0);
    assert_eq!(out.recovered, vec![]);
    assert_eq!(out.cold_mismatches, vec![]);
    assert_eq!(store.expected(11), Some(crc32c(&d[4096..8192])));
    store.close().unwrap();
    assert_eq!(header_state(&sp), 0, "clean after close");
}

#[test]
fn process_crash_loses_no_checksum_and_recovers_only_the_write_in_flight() {
    // 4 MiB + 1 KiB: regions 0..=3 of 1 MiB and region 4 of 1 KiB.
    let size = 4 * MIB + 1024;
    let img = Img::new(size, 15);
    let (store, _) = img.open();
    assert_eq!(store.region_count(), 5);
    // Flushed: a write to region 0.
    complete_write(&img, &store, 0, &pattern(4096, 150));
    flush(&img, &store);
    // Since the last FLUSH: a WRITE completed in region 1, its checksums set
    // from those taken at submission (as the data path does)...
    let b = pattern(8192, 151);
    let off_b = MIB + 5 * 4096;
    store.intent_begin(off_b, 8192).unwrap();
    store
        .set_expected(off_b / 4096, crc32c(&b[..4096]))
        .unwrap();
    store
        .set_expected(off_b / 4096 + 1, crc32c(&b[4096..]))
        .unwrap();
    img.write(off_b, &b);
    store.intent_end(off_b, 8192);
    // ...a DISCARD completed in region 2...
    let off_z = 2 * MIB + 8 * 4096;
    store.intent_begin(off_z, 3 * 4096).unwrap();
    store.record_zero(off_z, 3 * 4096).unwrap();
    img.write(off_z, &[0u8; 3 * 4096]);
    store.intent_end(off_z, 3 * 4096);
    // ...and at the crash two WRITEs in flight: in region 3, checksums
    // recorded and half the data landed; in the short region 4, recorded,
    // nothing landed.
    let c = pattern(8192, 152);
    let off_c = 3 * MIB + 16 * 4096;
    store.intent_begin(off_c, 8192).unwrap();
    store.record_write(off_c, &[&c]).unwrap();
    img.write(off_c, &c[..4096]);
    store.intent_begin(4 * MIB, 1024).unwrap();
    store.record_write(4 * MIB, &[&[0x5a; 1024]]).unwrap();
    let marked: Vec<bool> = (0..5).map(|r| store.region_marked(r)).collect();
    assert_eq!(marked, vec![false, true, true, true, true]);
    assert_eq!((store.in_flight(1), store.in_flight(3)), (0, 1));
    // kill -9: no close, no flush.
    drop(store);

    let (store, out) = img.open();
    assert!(out.unclean && !out.created);
    assert_eq!(out.marked_regions, 4);
    assert_eq!(out.cold_mismatches, vec![]);
    assert_eq!(
        out.recovered,
        vec![
            RecoveredRegion {
                region: 3,
                first_sector: 3 * MIB / 512,
                len_bytes: MIB,
                blocks: vec![off_c / 4096 + 1],
            },
            RecoveredRegion {
                region: 4,
                first_sector: 4 * MIB / 512,
                len_bytes: 1024,
                blocks: vec![4 * MIB / 4096],
            },
        ]
    );
    // The completed writes' checksums survived the crash (not re-learned).
    assert_eq!(store.expected(off_b / 4096), Some(crc32c(&b[..4096])));
    assert_eq!(store.expected(off_z / 4096 + 2), Some(crc_of_zero_block()));
    img.assert_consistent(&store);
    assert_eq!(store.marked_regions(), 0, "bitmap cleared after recovery");
    // Recovery was made durable: scrub after close is clean, next open clean.
    store.close().unwrap();
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(
        rep.ok() && rep.store_clean && rep.mismatches.is_empty(),
        "{rep}"
    );
    let (_s, out) = img.open();
    assert!(!out.unclean && out.recovered.is_empty() && out.marked_regions == 0);
}

#[test]
fn cold_corruption_survives_an_unclean_restart_and_fails_scrub() {
    let img = Img::new(3 * MIB, 16);
    let (store, _) = img.open();
    // Block 300 (region 1), written and flushed long ago, is changed behind
    // pinblk's back...
    let old = img.read(300 * 4096, 4096);
    img.write(300 * 4096 + 100, b"scribble");
    let new = img.read(300 * 4096, 4096);
    // ...while region 2 has a write in flight whose data never landed; kill -9.
    let w = 2 * MIB + 4096;
    store.intent_begin(w, 4096).unwrap();
    store.record_write(w, &[&pattern(4096, 161)]).unwrap();
    drop(store);

    // Scrub before the restart: the in-flight block is listed but does not
    // fail; block 300 fails.
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(!rep.store_clean && !rep.ok(), "{rep}");
    assert_eq!((rep.marked_regions, rep.failures()), (1, 1));
    assert_eq!(
        rep.mismatches[0],
        ScrubMismatch {
            block: 300,
            sector: 2400,
            expected: crc32c(&old),
            found: crc32c(&new),
            in_intent_region: false,
        }
    );
    assert_eq!(rep.mismatches[1].block, w / 4096);
    assert!(rep.mismatches[1].in_intent_region);
    let text = rep.to_string();
    assert!(
        text.contains("(block 513): csum")
            && text.contains("in a write-intent region (may have been in flight; `pinblk serve` will re-learn it)"),
        "{text}"
    );

    // The restart re-learns the in-flight block and keeps block 300's checksum.
    let (store, out) = img.open();
    assert_eq!(
        out.cold_mismatches,
        vec![Mismatch {
            block: 300,
            expected: crc32c(&old),
            found: crc32c(&new),
        }]
    );
    let blocks: Vec<(u64, Vec<u64>)> = out
        .recovered
        .iter()
        .map(|r| (r.region, r.blocks.clone()))
        .collect();
    assert_eq!(blocks, vec![(2, vec![w / 4096])]);
    assert_eq!(store.expected(300), Some(crc32c(&old)), "not adopted");
    assert_eq!(store.verify(300 * 4096, &[&new]).unwrap().len(), 1);
    // Another crash: it is found again (the evidence stays), nothing recovered.
    drop(store);
    let (store, out) = img.open();
    assert_eq!(out.cold_mismatches.len(), 1);
    assert!(out.recovered.is_empty());
    store.close().unwrap();
    // And scrub of the clean store fails on it.
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(rep.store_clean && !rep.ok() && rep.failures() == 1, "{rep}");
}

#[test]
fn flush_end_clears_only_quiet_regions_older_than_the_ticket() {
    let img = Img::new(4 * MIB, 17);
    let (store, _) = img.open();
    let r = |i: u64| i * MIB;
    let marked = |s: &ChecksumStore| (0..4).map(|i| s.region_marked(i)).collect::<Vec<_>>();
    // Region 0: completed before the FLUSH was submitted.
    store.intent_begin(r(0), 4096).unwrap();
    store.intent_end(r(0), 4096);
    // Region 1: in flight when the FLUSH is submitted, completes before it ends.
    store.intent_begin(r(1), 4096).unwrap();
    // Region 2: one write completed before, one still in flight.
    store.intent_begin(r(2), 4096).unwrap();
    store.intent_begin(r(2) + 4096, 4096).unwrap();
    store.intent_end(r(2), 4096);
    let t = store.flush_begin();
    // Region 3: begun and completed after the FLUSH was submitted.
    store.intent_begin(r(3), 4096).unwrap();
    store.intent_end(r(3), 4096);
    store.intent_end(r(1), 4096);
    let in_flight: Vec<u32> = (0..4).map(|i| store.in_flight(i)).collect();
    assert_eq!(in_flight, vec![0, 0, 1, 0]);
    assert_eq!(marked(&store), vec![true; 4]);
    store.flush_end(t);
    assert_eq!(marked(&store), vec![false, true, true, true]);
    // The next FLUSH: only region 2 still has a write in flight.
    let t2 = store.flush_begin();
    assert!(t2 > t);
    store.flush_end(t2);
    assert_eq!(marked(&store), vec![false, false, true, false]);
    store.intent_end(r(2) + 4096, 4096);
    store.flush_end(store.flush_begin());
    assert_eq!(marked(&store), vec![false; 4]);
    assert_eq!(store.marked_regions(), 0);

    // A range across region boundaries marks each region it touches.
    store.intent_begin(2 * MIB - 512, MIB + 1024).unwrap();
    assert_eq!(marked(&store), vec![false, true, true, true]);
    store.intent_end(2 * MIB - 512, MIB + 1024);
    store.flush_end(store.flush_begin());
    assert_eq!(store.marked_regions(), 0);

    // Errors and no-ops.
    assert!(matches!(
        store.intent_begin(4 * MIB - 512, 1024),
        Err(IntegrityError::OutOfRange { .. })
    ));
    store.intent_begin(MIB, 0).unwrap();
    assert_eq!(store.marked_regions(), 0);
    store.intent_end(0, 4096); // nothing in flight: logged, ignored
    assert_eq!(store.in_flight(0), 0);

    // close refuses while a write is in flight and leaves the store in use.
    store.intent_begin(0, 4096).unwrap();
    let e = store.close().unwrap_err();
    assert!(
        matches!(e, IntegrityError::InFlightAtClose { regions: 1, .. }),
        "{e}"
    );
    let (store, out) = img.open();
    assert!(out.unclean && out.marked_regions == 1 && out.recovered.is_empty());
    store.close().unwrap();
    let ro = StoreOptions {
        read_only: true,
        identity: None,
        ..StoreOptions::default()
    };
    let (ro_store, _) = ChecksumStore::open(&img.path, &ro).unwrap();
    assert!(matches!(
        ro_store.intent_begin(0, 4096),
        Err(IntegrityError::ReadOnly(_))
    ));
}

#[test]
fn intent_bits_hold_while_flushes_race() {
    // Writers begin and end writes on a few regions while a flusher clears
    // bits as fast as it can: a region with a write in flight is marked,
    // always.
    let img = Img::new(4 * MIB, 18);
    let (store, _) = img.open();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let (store, stop) = (&store, &stop);
        s.spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.flush_end(store.flush_begin());
            }
        });
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                s.spawn(move || {
                    (0..20_000u64).all(|i| {
                        let off = ((i + t) % 4) * MIB + t * 4096;
                        store.intent_begin(off, 4096).unwrap();
                        let ok = store.region_marked(off / MIB);
                        store.intent_end(off, 4096);
                        ok
                    })
                })
            })
            .collect();
        let ok = writers.into_iter().all(|w| w.join().unwrap_or(false));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(ok, "a region with a write in flight was not marked");
    });
    assert!((0..4).all(|r| store.in_flight(r) == 0));
    store.flush_end(store.flush_begin());
    assert_eq!(store.marked_regions(), 0);
}

#[test]
fn layout_of_odd_image_sizes() {
    const GIB: u64 = 1 << 30;
    for (size, blocks, regions, bitmap_len) in [
        (512, 1, 1, 4096),
        (10 * 512, 2, 1, 4096),
        (MIB, 256, 1, 4096),
        (MIB + 512, 257, 2, 4096),
        (3 * MIB - 4096 + 1536, 768, 3, 4096),
        (32 * GIB, 8 * MIB, 32768, 4096),
        (32 * GIB + 512, 8 * MIB + 1, 32769, 8192),
    ] {
        let l = StoreLayout::new(size, REGION_SIZE);
        assert_eq!(
            (l.block_count, l.region_count, l.bitmap_len),
            (blocks, regions, bitmap_len),
            "{size}"
        );
        assert_eq!(l.bitmap_offset, HEADER_SIZE);
        assert_eq!(l.table_offset, HEADER_SIZE + bitmap_len);
        assert_eq!(l.file_len, l.table_offset + 4 * blocks);
    }
    // Per GiB: 1 MiB of table, 128 bytes of bitmap.
    let l = StoreLayout::new(GIB, REGION_SIZE);
    assert_eq!((4 * l.block_count, l.region_count / 8), (MIB, 128));

    // Real stores of odd sizes: file length, header fields, and a write in
    // flight in the last, short region.
    for size in [10 * 512, MIB + 512, 2 * MIB + 7 * 512] {
        let img = Img::new(size, 19);
        let sp = img.store_path();
        let (store, _) = img.open();
        let l = store.layout();
        assert_eq!(l, StoreLayout::new(size, REGION_SIZE));
        assert_eq!(std::fs::metadata(&sp).unwrap().len(), l.file_len);
        let fields: Vec<u64> = [56, 64, 72, 80, 88]
            .iter()
            .map(|&o| header_u64(&sp, o))
            .collect();
        assert_eq!(
            fields,
            vec![
                REGION_SIZE,
                l.region_count,
                l.bitmap_offset,
                l.bitmap_len,
                l.table_offset
            ]
        );
        let last = l.region_count - 1;
        store.intent_begin(size - 512, 512).unwrap();
        assert!(store.region_marked(last) && stored_bit(&sp, last));
        store
            .record_write_with(size - 512, &[&[9u8; 512]], img.read_rest())
            .unwrap();
        drop(store);
        let (_s, out) = img.open();
        assert_eq!(
            out.recovered,
            vec![RecoveredRegion {
                region: last,
                first_sector: last * MIB / 512,
                len_bytes: size - last * MIB,
                blocks: vec![(size - 512) / 4096],
            }],
            "{size}"
        );
    }
}

/// Writes a version 1 store for `img`, as the previous pinblk did: header
/// (table CRC when clean) and the table right after it.
fn write_v1_store(img: &Img, state: u32, generation: u64, table: &[u32]) {
    let size = img.file.metadata().unwrap().len();
    let t: Vec<u8> = table.iter().flat_map(|c| c.to_le_bytes()).collect();
    let mut h = vec![0u8; 4096];
    h[0..8].copy_from_slice(b"PINBLKCS");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&4096u32.to_le_bytes());
    h[16..20].copy_from_slice(&1u32.to_le_bytes());
    h[20..24].copy_from_slice(&state.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    h[32..40].copy_from_slice(&(table.len() as u64).to_le_bytes());
    h[40..48].copy_from_slice(&generation.to_le_bytes());
    if state == 0 {
        h[52..56].copy_from_slice(&crc32c(&t).to_le_bytes());
    }
    let c = crc32c(&h);
    h[48..52].copy_from_slice(&c.to_le_bytes());
    std::fs::write(img.store_path(), [h, t].concat()).unwrap();
}

#[test]
fn version_1_store_is_migrated() {
    let img = Img::new(3 * MIB, 20);
    let sp = img.store_path();
    let mut table: Vec<u32> = (0..768)
        .map(|b| crc32c(&img.read(b * 4096, 4096)))
        .collect();
    // Clean: scrub (read-only) refuses it and says what to do; serving migrates it.
    write_v1_store(&img, 0, 7, &table);
    let e = scrub(&img.path, &sp, |_, _| {}).unwrap_err();
    assert!(
        matches!(e, IntegrityError::NeedsMigration { found: 1, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("format version 1") && e.to_string().contains("pinblk serve"),
        "{e}"
    );
    let (store, out) = img.open();
    assert_eq!(out.migrated_from, Some(1));
    assert!(!out.unclean && !out.created && out.generation == 8);
    assert_eq!(store.layout(), StoreLayout::new(3 * MIB, REGION_SIZE));
    assert_eq!(
        std::fs::metadata(&sp).unwrap().len(),
        store.layout().file_len
    );
    assert_eq!(header_u64(&sp, 8) as u32, STORE_VERSION);
    img.assert_consistent(&store);
    store.close().unwrap();
    assert!(scrub(&img.path, &sp, |_, _| {}).unwrap().ok());
    assert!(!default_store_path(&img.path)
        .with_extension("pinsum.tmp")
        .exists());

    // Left in use by a version 1 pinblk (entries of writes never flushed):
    // version 1 recorded no write intent, so every region counts as marked
    // and its mismatches are re-learned, as version 1 did.
    table[5] ^= 1;
    table[600] ^= 1;
    write_v1_store(&img, 1, 9, &table);
    let (store, out) = img.open();
    assert_eq!(out.migrated_from, Some(1));
    assert!(out.unclean && out.marked_regions == 3);
    let blocks: Vec<(u64, Vec<u64>)> = out
        .recovered
        .iter()
        .map(|r| (r.region, r.blocks.clone()))
        .collect();
    assert_eq!(blocks, vec![(0, vec![5]), (2, vec![600])]);
    assert!(out.cold_mismatches.is_empty());
    img.assert_consistent(&store);
}

#[test]
fn crash_at_random_points_leaves_nothing_unrecovered() {
    // Random sequences of writes (whole, partial, zeroes) bracketed by
    // intent_begin/intent_end as the data path does, FLUSHes, and writes
    // left in flight at the crash (landed fully, partly or not at all).
    // After reopening: the image verifies completely, nothing is cold, the
    // marked regions are exactly those written since the last FLUSH or with
    // a write in flight, and blocks are re-learned only where a write was in
    // flight.
    const SIZE: u64 = 4 * MIB;
    let mut rng = 0x1234_5678_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..12 {
        let img = Img::new(SIZE, 200 + round);
        let (store, _) = img.open();
        let mut marked = std::collections::BTreeSet::new();
        let mut in_flight = std::collections::BTreeSet::new();
        for _ in 0..40 {
            // Offsets clustered near region boundaries, so writes straddle them.
            let off = ((next(4) * MIB) + next(64) * 512).saturating_sub(16 * 512);
            let len = ((next(12) + 1) * 512).min(SIZE - off);
            let regions = off / MIB..=(off + len - 1) / MIB;
            let data = pattern(len as usize, next(1 << 30));
            match next(5) {
                0 => {
                    flush(&img, &store);
                    marked = in_flight.clone();
                }
                1 => {
                    store.intent_begin(off, len).unwrap();
                    store.record_zero_with(off, len, img.read_rest()).unwrap();
                    img.write(off, &vec![0; len as usize]);
                    store.intent_end(off, len);
                    marked.extend(regions);
                }
                2 => {
                    store.intent_begin(off, len).unwrap();
                    store
                        .record_write_with(off, &[&data], img.read_rest())
                        .unwrap();
                    match next(3) {
                        0 => img.write(off, &data),
                        1 => img.write(off, &data[..data.len() / 2]),
                        _ => {}
                    }
                    marked.extend(regions.clone());
                    in_flight.extend(regions);
                }
                _ => {
                    store.intent_begin(off, len).unwrap();
                    store
                        .record_write_with(off, &[&data], img.read_rest())
                        .unwrap();
                    img.write(off, &data);
                    store.intent_end(off, len);
                    marked.extend(regions);
                }
            }
        }
        for r in 0..4 {
            assert_eq!(
                store.region_marked(r),
                marked.contains(&r),
                "round {round} region {r}"
            );
        }
        drop(store);
        let (store, out) = img.open();
        assert!(out.unclean);
        assert_eq!(out.marked_regions, marked.len() as u64, "round {round}");
        assert_eq!(out.cold_mismatches, vec![], "round {round}");
        assert!(
            out.recovered.iter().all(|r| in_flight.contains(&r.region)),
            "round {round}: {:?} vs in flight {in_flight:?}",
            out.recovered
        );
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
            in_intent_region: false,
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
    assert!(out.recovered.is_empty() && out.cold_mismatches.is_empty());
    assert_eq!(store.verify(257 * 4096, &[&new]).unwrap().len(), 1);
}

#[test]
fn scrub_reports_unclean_store() {
    let img = Img::new(4 * 4096, 17);
    let (store, _) = img.open();
    // In flight at the crash: checksum recorded, data not landed.
    store.intent_begin(0, 4096).unwrap();
    store.record_write(0, &[&[7u8; 4096]]).unwrap();
    drop(store);
    let rep = scrub(&img.path, &img.store_path(), |_, _| {}).unwrap();
    assert!(!rep.store_clean && rep.ok(), "{rep}");
    assert_eq!(rep.mismatches.len(), 1);
    assert!(rep.mismatches[0].in_intent_region);
    let text = rep.to_string();
    assert!(
        text.contains("NOT closed cleanly") && text.contains("in a write-intent region"),
        "{text}"
    );
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
    // Write intent: a begin/end pair on a region already marked (the common
    // case), and one FLUSH's flush_begin/flush_end with 4 regions marked.
    let t = Instant::now();
    for i in 0..n2 {
        let off = (i % 1024) * 4096;
        store.intent_begin(off, 4096).unwrap();
        store.intent_end(off, 4096);
    }
    let intent_ns = t.elapsed().as_nanos() as f64 / n2 as f64;
    let t = Instant::now();
    for _ in 0..10_000 {
        store.intent_begin(0, 4 << 20).unwrap();
        store.intent_end(0, 4 << 20);
        store.flush_end(store.flush_begin());
    }
    let clear_ns = t.elapsed().as_nanos() as f64 / 10_000.0;
    drop(store);
    // Open of a 64 MiB non-sparse image: clean, then after an unclean stop
    // (full scan; nothing marked), page cache warm.
    let big_img = Img::new(64 << 20, 45);
    let (s, _) = big_img.open();
    s.close().unwrap();
    // Image written back first: recovery fdatasyncs it, which would
    // otherwise time the writeback of 64 MiB of dirty pages.
    big_img.file.sync_all().unwrap();
    let t = Instant::now();
    let (s, _) = big_img.open();
    let clean_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(s);
    let t = Instant::now();
    let (_s, out) = big_img.open();
    assert!(out.unclean);
    let scan_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "64 MiB image: clean open {clean_ms:.1} ms; open after an unclean stop (full scan) {scan_ms:.1} ms"
    );
    println!(
        "crc32c(4 KiB): {crc_ns:.0} ns; record_write(4 KiB): {rec_ns:.0} ns; verify(4 KiB): {ver_ns:.0} ns; \
         record_write_with(512 B, read rest via pread): {part_ns:.0} ns; crc32c throughput {gbps:.1} GB/s; \
         intent_begin+intent_end (4 KiB, region marked): {intent_ns:.0} ns; \
         4 regions begin+end+flush_begin+flush_end: {clear_ns:.0} ns; \
         record+flush (mmap store + fdatasync of the store): {flush_us:.1} us"
    );
}

/// A store records the identity of the block device it was made for and
/// refuses any other image: another device, or an image file; an image
/// file's store (identity length 0, as every older store) stays readable
/// for files; scrub (read-only, no identity given) reads any store.
#[test]
fn store_records_and_checks_the_device_identity() {
    let img = Img::new(1 << 20, 3);
    let dev = |id: &str| StoreOptions {
        identity: Some(id.into()),
        ..StoreOptions::default()
    };
    let (store, out) = ChecksumStore::open(&img.path, &dev("wwid:naa.1")).unwrap();
    assert!(out.created);
    store.close().unwrap();
    let bytes = std::fs::read(img.store_path()).unwrap();
    assert_eq!(&bytes[96..100], &10u32.to_le_bytes());
    assert_eq!(&bytes[100..110], b"wwid:naa.1");
    let e = img.open_err(&dev("wwid:naa.2"));
    assert!(matches!(e, IntegrityError::IdentityMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("block device \"wwid:naa.1\"")
            && msg.contains("block device \"wwid:naa.2\"")
            && msg.contains("remove"),
        "{msg}"
    );
    let e = img.open_err(&StoreOptions::default());
    assert!(
        e.to_string()
            .contains("but the image served is an image file"),
        "{e}"
    );
    let (store, _) = ChecksumStore::open(&img.path, &dev("wwid:naa.1")).unwrap();
    store.close().unwrap();
    let ro = StoreOptions {
        read_only: true,
        ..StoreOptions::default()
    };
    let (store, _) = ChecksumStore::open(&img.path, &ro).unwrap();
    drop(store);

    // An image file's store is refused for a device.
    std::fs::remove_file(img.store_path()).unwrap();
    let (store, _) = img.open();
    store.close().unwrap();
    let e = img.open_err(&dev("loop:/x.img"));
    assert!(e.to_string().contains("was made for an image file"), "{e}");
}

#[test]
fn flush_epochs_move_at_flushes_not_at_writes() {
    let img = Img::new(2 * MIB, 17);
    let (store, _) = img.open();
    let t0 = store.flush_begin();
    for i in 0..3 {
        store.intent_begin(i * 4096, 4096).unwrap();
        store.intent_end(i * 4096, 4096);
    }
    let t1 = store.flush_begin();
    assert_eq!(t1.epoch(), t0.epoch() + 1, "writes do not move the epoch");
    // The writes ended after the first FLUSH was submitted: it does not
    // cover them, the second one does.
    store.flush_end(t0);
    assert!(store.region_marked(0));
    store.flush_end(t1);
    assert!(!store.region_marked(0));
    // A write in flight across two FLUSHes keeps its region marked until it
    // ends and a FLUSH submitted after that completes.
    store.intent_begin(MIB, 4096).unwrap();
    let t2 = store.flush_begin();
    store.flush_end(t2);
    assert!(store.region_marked(1));
    store.intent_end(MIB, 4096);
    store.flush_end(t2);
    assert!(store.region_marked(1), "ended after t2 was taken");
    store.flush_end(store.flush_begin());
    assert!(!store.region_marked(1));
}
