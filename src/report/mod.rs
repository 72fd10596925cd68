//! Report events: one JSON object per line (`--report PATH`), one human line
//! per event in the log, and running counters.
//!
//! An [`Event`] is a time stamp and an [`EventBody`]: one variant per `kind`,
//! each a struct with exactly that kind's fields ([`event`]). [`ReportWriter`]
//! writes, logs and counts them ([`sink`]); [`summary`] summarizes a report
//! file for `pinblk report`.
//!
//! # JSON Lines schema
//!
//! Every line is one flat JSON object. Optional fields are omitted when
//! absent (never `null`); list fields are omitted when empty.
//!
//! Every kind: `time` (RFC 3339, UTC, microseconds), `unix_time` (seconds
//! since the epoch, with fraction), `kind` (`conflict` | `torn_write` |
//! `checksum_failure` | `recovered` | `migration`).
//!
//! - `conflict` ([`ConflictEvent`]): `request_id`, `queue`, `op` (`read` |
//!   `write`), `sector` (of the request, 512-byte units), `length` (bytes),
//!   `rule` (`R1` | `R2` | `long_term`), `policy` (`passthrough` | `bounce` |
//!   `stall` | `fail`), `action` (`passthrough` | `bounce` | `stall` |
//!   `stall_timeout_bounce` | `fail`), `stall_us` (microseconds; only with
//!   `stall` and `stall_timeout_bounce`), `pin_direction` (`DeviceWrite` |
//!   `DeviceRead`: of the oldest conflicting pin), `pin_age_us`
//!   (microseconds), `overlapping` (request ids), `guest_ranges`, optional
//!   `detail`.
//! - `torn_write` ([`TornWriteEvent`], R3; one per changed 4 KiB chunk):
//!   `request_id`, `queue`, `op` (`write`), `sector` (of the chunk), `length`
//!   (of the chunk, at most 4096 bytes), `block` (4 KiB units),
//!   `algorithm` (`crc32c`), `expected` (checksum at submission, now stored),
//!   `found` (checksum of what reached the disk), `rule` (`R3`), `outcome`
//!   (`submitted_bytes` | `later_bytes` | `neither`: what reached the disk),
//!   `policy`, `action` (`zero_copy`), `guest_ranges`, `detail`.
//! - `checksum_failure` ([`ChecksumFailureEvent`], R4): `request_id`,
//!   `queue`, `op` (`read`), `sector` (`block * 8`), `length` (4096),
//!   `block`, `algorithm`, `expected` (stored), `found` (of the data re-read
//!   from the image), `rule` (`R4`), `policy`, `action` (`report` | `eio`,
//!   from `--on-mismatch`), `guest_ranges`. Found at start after an unclean
//!   stop, outside every write-intent region: no `request_id`, `queue`,
//!   `guest_ranges`; `op` `other`, `action` `report`, a `detail`.
//! - `recovered` ([`RecoveredEvent`], at open after an unclean stop, one per
//!   write-intent region): `op` (`other`), `sector` (region start), `length`
//!   (region bytes), `region`, `blocks` (count re-checksummed from the
//!   image), `first_block`, `block_list` (4 KiB units), `detail`.
//! - `migration` ([`MigrationEvent`], when a connection that handed its
//!   guest over has ended and been drained): `source_connection`,
//!   `destination_connection` (omitted when the destination is not on this
//!   host), `requests_drained` (in flight at the source's ring stops),
//!   `detail`. No `op`, `sector` or `action`.
//!
//! Checksums are strings `"0x%08x"` ([`Crc`]), in btrfs order: what the
//! store holds (`expected`), then what the data has (`found`). Guest ranges
//! are `"0xGPA+0xLEN"` (bytes, [`gpa_range`]).

use std::path::{Path, PathBuf};

pub mod event;
pub mod lifecycle;
pub mod sink;
pub mod summary;

#[cfg(test)]
mod tests;

pub use event::{
    gpa_range, now, rfc3339, Algorithm, BlockCsum, ChecksumAction, ChecksumFailureEvent,
    ConflictAction, ConflictEvent, Crc, Event, EventBody, EventKind, MigrationEvent, Outcome,
    RecoveredEvent, ReportOp, TornWriteAction, TornWriteEvent,
};
pub use sink::{human_line, CountersSnapshot, IntegrityCounters, ReportWriter};

/// Errors opening or reading a report file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The report file cannot be opened, read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The report file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads a JSON Lines report: the events that parse, in file order, and the
/// number of non-empty lines that did not (e.g. a line cut short by a crash).
///
/// # Errors
/// [`ReportError::Io`] if the file cannot be read.
pub fn read_report(path: &Path) -> Result<(Vec<Event>, u64), ReportError> {
    let bytes = std::fs::read(path).map_err(|source| ReportError::Io {
        what: "read report",
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let mut events = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(e) => events.push(e),
            Err(_) => bad += 1,
        }
    }
    Ok((events, bad))
}
