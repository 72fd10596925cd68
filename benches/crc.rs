//! Chooses the CRC32C implementation (issue 17): criterion micro-benchmark of
//! the candidate crates on hot buffers at 4 KiB (one checksum block) and
//! 128 KiB (a typical sequential request), with memcpy of the same size as
//! the reference for "near memory bandwidth", and the fused copy+CRC the
//! bounce path does (copy 4 KiB, checksum it while it is in L1).
//!
//! Run: `cargo bench --bench crc` (add `-- --quick` for a short run). Under
//! `cargo test --all-targets` each function runs once as a smoke test.
//!
//! Candidates, all CRC-32/ISCSI (Castagnoli, reflected, init and xorout
//! `!0`, check value 0xe3069283):
//! - `crc32c` 0.6: SSE 4.2 `crc32` instruction, three streams interleaved;
//! - `crc-fast` 1.x: carry-less multiply folding (VPCLMULQDQ / AVX-512 when
//!   present) fused with the `crc32` instruction;
//! - `crc` 3.x: portable slice-by-16 tables (no SIMD), as a floor.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 2] = [4 << 10, 128 << 10];

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

static CRC_TABLE16: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

fn candidates(c: &mut Criterion) {
    // The candidates agree with each other and with the check value first.
    let check = b"123456789";
    assert_eq!(crc32c::crc32c(check), 0xe306_9283);
    assert_eq!(crc_fast::crc32_iscsi(check), 0xe306_9283);
    assert_eq!(CRC_TABLE16.checksum(check), 0xe306_9283);
    assert_eq!(pinblk::integrity::crc32c(check), 0xe306_9283);

    let mut g = c.benchmark_group("crc32c");
    for len in SIZES {
        let buf = data(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("crc32c-0.6", len), &buf, |b, buf| {
            b.iter(|| crc32c::crc32c(black_box(buf)))
        });
        g.bench_with_input(BenchmarkId::new("crc-fast", len), &buf, |b, buf| {
            b.iter(|| crc_fast::crc32_iscsi(black_box(buf)))
        });
        g.bench_with_input(BenchmarkId::new("crc-slice16", len), &buf, |b, buf| {
            b.iter(|| CRC_TABLE16.checksum(black_box(buf)))
        });
        g.bench_with_input(BenchmarkId::new("pinblk", len), &buf, |b, buf| {
            b.iter(|| pinblk::integrity::crc32c(black_box(buf)))
        });
        g.bench_with_input(BenchmarkId::new("pinblk-4k-chunks", len), &buf, |b, buf| {
            b.iter(|| {
                black_box(buf)
                    .chunks(4096)
                    .fold(0u32, |a, c| a ^ pinblk::integrity::crc32c(c))
            })
        });
        let mut dst = vec![0u8; len];
        g.bench_with_input(BenchmarkId::new("memcpy", len), &buf, |b, buf| {
            b.iter(|| {
                dst.copy_from_slice(black_box(buf));
                black_box(&dst);
            })
        });
        g.bench_with_input(BenchmarkId::new("copy+crc-fused", len), &buf, |b, buf| {
            b.iter(|| {
                pinblk::integrity::copy_crc32c_blocks(&mut dst, &[black_box(&buf[..])], |_, c| {
                    black_box(c);
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, candidates);
criterion_main!(benches);
