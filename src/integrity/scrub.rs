//! Offline verification of a whole image against its checksum store
//! (`pinblk scrub --image PATH`).

use std::fmt;
use std::fs::File;
use std::path::Path;

use serde::Serialize;

use super::store::scan_image;
use super::{hex_crc, ChecksumStore, IntegrityError, StoreOptions, BLOCK_SIZE, SECTORS_PER_BLOCK};

/// One block whose image content does not match its stored checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ScrubMismatch {
    /// Block index (4 KiB units).
    pub block: u64,
    /// First sector of the block (512-byte units): `block * 8`.
    pub sector: u64,
    /// Checksum in the store.
    pub expected: u32,
    /// Checksum of the block in the image.
    pub found: u32,
    /// The store is not closed cleanly and the block is in a marked
    /// write-intent region: a write may have been in flight there, and the
    /// next `pinblk serve` re-learns it (reported `recovered`). Such a
    /// mismatch does not fail the scrub; every other one does.
    pub in_intent_region: bool,
}

/// Result of [`scrub`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    /// Image size covered, bytes.
    pub image_size: u64,
    /// Blocks verified (4 KiB units).
    pub blocks: u64,
    /// The store was closed cleanly. When false, the last pinblk did not
    /// close it (crash, `kill -9`): mismatches in marked write-intent regions
    /// may be writes that were in flight, which the next `pinblk serve`
    /// re-learns and reports as `recovered`; the others are failures.
    pub store_clean: bool,
    /// Write-intent regions marked in the store (0 when closed cleanly).
    pub marked_regions: u64,
    /// Store generation.
    pub generation: u64,
    /// Mismatching blocks, in block order.
    pub mismatches: Vec<ScrubMismatch>,
}

impl ScrubReport {
    /// True when no mismatch fails the scrub: every block matched, or (store
    /// not closed cleanly) every mismatching block is in a marked
    /// write-intent region.
    pub fn ok(&self) -> bool {
        self.failures() == 0
    }

    /// Mismatches that fail the scrub (all of them on a clean store; those
    /// outside every marked region on an unclean one).
    pub fn failures(&self) -> usize {
        self.mismatches
            .iter()
            .filter(|m| !m.in_intent_region)
            .count()
    }
}

impl fmt::Display for ScrubReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.mismatches {
            write!(
                f,
                "checksum failed at sector {:#x} (block {}): csum {} expected csum {} (crc32c)",
                m.sector,
                m.block,
                hex_crc(m.found),
                hex_crc(m.expected)
            )?;
            if m.in_intent_region {
                write!(f, "; in a write-intent region (may have been in flight; `pinblk serve` will re-learn it)")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "scrub: {} blocks of 4 KiB ({} bytes) verified, {} mismatch(es), {} failing, store generation {}, {}",
            self.blocks,
            self.image_size,
            self.mismatches.len(),
            self.failures(),
            self.generation,
            if self.store_clean {
                "store closed cleanly".to_string()
            } else {
                format!(
                    "store NOT closed cleanly (unclean stop), {} write-intent region(s) marked: mismatches in them may be in-flight writes, which serving the image once re-learns; mismatches outside them are failures",
                    self.marked_regions
                )
            }
        )
    }
}

/// Verifies every 4 KiB block of the image at `image_path` against the store
/// at `store_path`, offline (the store is opened read-only with a shared
/// lock and never changed). The image size is the image file's length
/// rounded down to 512-byte sectors and must equal the store's. On a store
/// not closed cleanly, mismatches inside marked write-intent regions are
/// listed but do not fail the scrub ([`ScrubReport::ok`]).
/// `progress(done_blocks, total_blocks)` is called every 1 MiB.
///
/// # Errors
/// Every error of [`ChecksumStore::open`] for a read-only open (missing,
/// mismatching or corrupt store; [`IntegrityError::InUse`] while a pinblk
/// serves the image), and [`IntegrityError::Io`] reading the image.
pub fn scrub(
    image_path: &Path,
    store_path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<ScrubReport, IntegrityError> {
    let opts = StoreOptions {
        store_path: Some(store_path.to_path_buf()),
        image_size: None,
        read_only: true,
        identity: None,
    };
    let (store, outcome) = ChecksumStore::open_with_progress(image_path, &opts, &mut |_, _| {})?;
    let image = File::open(image_path).map_err(|source| IntegrityError::Io {
        what: "open image",
        path: image_path.to_path_buf(),
        source,
    })?;
    let mut mismatches = Vec::new();
    scan_image(
        &image,
        image_path,
        store.image_size(),
        &mut progress,
        |block, found| {
            let expected = store.expected(block).unwrap_or_default();
            if expected != found {
                mismatches.push(ScrubMismatch {
                    block,
                    sector: block * SECTORS_PER_BLOCK,
                    expected,
                    found,
                    in_intent_region: outcome.unclean
                        && store.region_marked(store.region_of(block * BLOCK_SIZE)),
                });
            }
        },
    )?;
    Ok(ScrubReport {
        image_size: store.image_size(),
        blocks: store.block_count(),
        store_clean: !outcome.unclean,
        marked_regions: outcome.marked_regions,
        generation: outcome.generation,
        mismatches,
    })
}
