//! The store format's CRC32C values do not depend on the CRC crate: the
//! implementation pinblk uses (`crc-fast`) gives the RFC 3720 / iSCSI test
//! vectors and the same values as the `crc32c` crate the format was first
//! written with, for every length and split, and a store written by that
//! earlier pinblk still opens and scrubs clean (header CRC, table CRC and
//! every block).

mod common;

use std::path::Path;

use common::pattern;
use pinblk::integrity::{copy_crc32c_blocks, crc32c, crc32c_append, crc32c_slices, scrub};

#[test]
fn crc32c_gives_the_iscsi_test_vectors() {
    // The check value of CRC-32/ISCSI and RFC 3720 appendix B.4.
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    let inc: Vec<u8> = (0..32).collect();
    assert_eq!(crc32c(&inc), 0x46dd_794e);
    let dec: Vec<u8> = (0..32).rev().collect();
    assert_eq!(crc32c(&dec), 0x113f_db5c);
    assert_eq!(crc32c(b""), 0);
}

#[test]
fn crc32c_matches_the_crc32c_crate_for_every_length_and_split() {
    let data = pattern(17, 300 << 10);
    // Lengths around every size the folding code treats differently.
    let lens = (0..300).chain([
        4095,
        4096,
        4097,
        8192,
        65536,
        131072,
        131072 + 13,
        300 << 10,
    ]);
    for len in lens {
        let d = &data[..len];
        let want = crc32c::crc32c(d);
        assert_eq!(crc32c(d), want, "length {len}");
        for cut in [0, 1, len / 3, len / 2, len.saturating_sub(1), len] {
            let cut = cut.min(len);
            let (a, b) = d.split_at(cut);
            assert_eq!(crc32c_append(crc32c(a), b), want, "length {len} cut {cut}");
            assert_eq!(crc32c_slices([a, b]), want, "length {len} cut {cut}");
            // Appending to any CRC agrees with the other crate's append.
            let seed = crc32c::crc32c(&data[len % 1000..len % 1000 + 7]);
            assert_eq!(crc32c_append(seed, a), crc32c::crc32c_append(seed, a));
        }
    }
}

#[test]
fn fused_copy_and_crc_copies_and_checksums_each_block() {
    for len in [0, 1, 4096, 4097, 3 * 4096 + 100, 128 << 10] {
        let src = pattern(3, len);
        let mut dst = vec![0u8; len];
        let mut got = Vec::new();
        copy_crc32c_blocks(&mut dst, &[&src[..]], |i, c| got.push((i, c)));
        assert_eq!(dst, src, "length {len}");
        // The same from a scatter list cut anywhere.
        let (a, rest) = src.split_at(len / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut dst2 = vec![0u8; len];
        let mut got2 = Vec::new();
        copy_crc32c_blocks(&mut dst2, &[a, b, c], |i, c| got2.push((i, c)));
        assert_eq!((&dst2, &got2), (&dst, &got), "length {len}, three pieces");
        let want: Vec<(usize, u32)> = src.chunks(4096).map(crc32c::crc32c).enumerate().collect();
        assert_eq!(got, want, "length {len}");
    }
}

#[test]
fn a_store_written_with_the_crc32c_crate_scrubs_clean() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-crc32c");
    // Scrub opens the store read-only: the fixture is not modified.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    let store = dir.path().join("image.img.pinsum");
    std::fs::copy(fixture.join("image.img"), &image).unwrap();
    std::fs::copy(fixture.join("image.img.pinsum"), &store).unwrap();
    let report =
        scrub(&image, &store, |_, _| {}).expect("store opens: header and table CRCs match");
    assert!(report.store_clean);
    assert_eq!(report.blocks, 17);
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    // And the table holds exactly the crc32c crate's value of each block.
    let img = std::fs::read(&image).unwrap();
    let table = std::fs::read(&store).unwrap();
    let table = &table[table.len() - 4 * 17..];
    for (i, block) in img.chunks(4096).enumerate() {
        let stored = u32::from_le_bytes(table[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(stored, crc32c::crc32c(block), "block {i}");
        assert_eq!(stored, crc32c(block), "block {i}");
    }
}
