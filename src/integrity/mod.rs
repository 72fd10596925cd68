//! Integrity: per-block CRC32C of every write and the checksum store.
//!
//! Units used throughout this module (and named in every signature):
//! - **bytes**: offsets and lengths into the image (`offset`, `len`).
//! - **sectors**: 512-byte units, as virtio-blk and dm-integrity count them
//!   (`sector = byte offset / 512`).
//! - **blocks**: 4 KiB checksum blocks, numbered from 0 (`block = byte offset
//!   / 4096`, so `sector = block * 8`). The last block of an image whose size
//!   is not a multiple of 4096 is shorter: its checksum covers only the bytes
//!   that exist ([`ChecksumStore::block_len`]).
//!
//! Parts:
//! - [`ChecksumStore`] (`store.rs`): one CRC32C per block and a write-intent
//!   bitmap of 1 MiB regions in a memory-mapped file beside the image
//!   (`IMAGE.pinsum`): nothing lost by a process crash, durable at FLUSH,
//!   recovered after an unclean stop only where a write may have been in
//!   flight. `format.rs` has the header and layout (and the v1 → v2
//!   migration), `mapping.rs` the mmap, `error.rs` the errors.
//! - [`scrub`] (`scrub.rs`): offline verification of a whole image.

mod error;
mod format;
mod mapping;
pub mod ranges;
mod scrub;
mod store;

#[cfg(test)]
mod ranges_proptests;
#[cfg(test)]
mod tests;

pub use error::IntegrityError;
pub use format::{
    StoreLayout, ALGORITHM_CRC32C, HEADER_SIZE, REGION_SIZE, STORE_MAGIC, STORE_VERSION,
};
pub use scrub::{scrub, ScrubMismatch, ScrubReport};
pub use store::{
    default_store_path, ChecksumStore, FlushTicket, Mismatch, OpenOutcome, RecoveredRegion,
    StoreOptions,
};

use std::sync::OnceLock;

/// `--on-mismatch`: what a READ gets when a block fails verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMismatch {
    /// Report the checksum failure; the READ completes with the data.
    Report,
    /// Report it and complete the READ with VIRTIO_BLK_S_IOERR (as btrfs and dm-integrity do).
    Eio,
}

/// Size of one checksum block, in bytes (4 KiB).
pub const BLOCK_SIZE: u64 = 4096;
/// Size of one sector, in bytes (virtio-blk's and dm-integrity's unit).
pub const SECTOR_SIZE: u64 = 512;
/// Sectors per checksum block (8): `sector = block * SECTORS_PER_BLOCK`.
pub const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR_SIZE;
/// Name of the checksum algorithm as it appears in reports.
pub const ALGORITHM_NAME: &str = "crc32c";

/// CRC32C (Castagnoli, CRC-32/ISCSI: reflected polynomial 0x82f63b78,
/// initial value and final xor `!0`, check value 0xe3069283 for
/// `"123456789"`) of `data`. Same value as btrfs' default csum, fio's
/// `verify=crc32c` and iSCSI digests, and as the `crc32c` crate the store
/// format was first written with. Computed by the `crc-fast` crate
/// (carry-less multiply folding, VPCLMULQDQ / AVX-512 when the CPU has it,
/// fused with SSE 4.2 `crc32`): about 50 GB/s per core on a hot buffer on
/// the project's machine, 3x the `crc32c` crate (`benches/crc.rs`).
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// Continues a CRC32C: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`
/// (`crc32c_append(0, b) == crc32c(b)`).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    if crc == 0 {
        return crc32c(data);
    }
    // The digest's state is the CRC register before the final xor.
    let mut d =
        crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

/// CRC32C of the concatenation of `slices` (a scatter list, e.g. the guest
/// buffers of one descriptor chain), without copying them.
pub fn crc32c_slices<'a, I>(slices: I) -> u32
where
    I: IntoIterator<Item = &'a [u8]>,
{
    slices.into_iter().fold(0, crc32c_append)
}

/// Copies the scatter list `src` (concatenated) into `dst` 4 KiB at a time
/// and hands `each(index, crc)` the CRC32C of each 4 KiB chunk of `dst` (the
/// last may be shorter) right after copying it, while it is still in the L1
/// cache: one pass over the data from memory instead of two (the bounce
/// path's fused copy and checksum, docs/DESIGN.md §7). The CRCs are those of
/// the copy, whatever happens to `src` meanwhile.
///
/// # Panics
/// If `src` holds fewer bytes than `dst`.
pub fn copy_crc32c_blocks(dst: &mut [u8], src: &[&[u8]], mut each: impl FnMut(usize, u32)) {
    let (mut idx, mut pos) = (0usize, 0usize);
    for (i, chunk) in dst.chunks_mut(BLOCK_SIZE as usize).enumerate() {
        let mut at = 0;
        while at < chunk.len() {
            let s = src[idx];
            let k = (s.len() - pos).min(chunk.len() - at);
            chunk[at..at + k].copy_from_slice(&s[pos..pos + k]);
            (at, pos) = (at + k, pos + k);
            if pos == s.len() {
                (idx, pos) = (idx + 1, 0);
            }
        }
        each(i, crc32c(chunk));
    }
}

/// CRC32C of one full 4 KiB block of zero bytes: the checksum of a discarded
/// or zeroed block, and of a hole in a sparse image. Computed once.
pub fn crc_of_zero_block() -> u32 {
    static ZERO: OnceLock<u32> = OnceLock::new();
    *ZERO.get_or_init(|| crc32c(&[0u8; BLOCK_SIZE as usize]))
}

/// CRC32C of `len` zero bytes (`len` ≤ 4096 in practice: a short last block).
pub fn crc_of_zeros(len: usize) -> u32 {
    if len == BLOCK_SIZE as usize {
        return crc_of_zero_block();
    }
    let zeros = [0u8; 4096];
    let mut crc = 0;
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len());
        crc = crc32c_append(crc, &zeros[..n]);
        left -= n;
    }
    crc
}

/// Formats a checksum the way reports print it: `0x` and 8 lowercase hex digits.
pub fn hex_crc(crc: u32) -> String {
    format!("0x{crc:08x}")
}
