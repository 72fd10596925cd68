//! Report events: one JSON object per line (`--report PATH`), one human line
//! per event in the log, and running counters.
//!
//! # JSON Lines schema
//!
//! Every line is one [`ReportEvent`]. Always present: `time` (RFC 3339, UTC,
//! microseconds), `unix_time` (seconds since the epoch, with fraction), `kind`
//! (`checksum_failure` | `torn_write` | `recovered` | `conflict`). Present when
//! known (omitted, never `null`, otherwise): `request_id`, `queue`, `op`
//! (`read` | `write` | `flush` | `discard` | `write_zeroes` | `get_id` |
//! `other`), `sector` (512-byte units), `length` (bytes), `block` (4 KiB
//! units), `algorithm` (`crc32c`), `expected` and `found` (checksums as
//! `"0x%08x"`, btrfs order: what the store holds, then what the data has),
//! `rule` (`R1` | `R2` | `R3` | `R4` | `long_term`), `outcome`
//! (`submitted_bytes` | `later_bytes` | `neither`: what reached the disk after
//! a torn write), `policy` (`passthrough` | `bounce` | `stall` | `fail`),
//! `action` (what was done: for conflicts `passthrough`, `bounce`, `stall`,
//! `stall_timeout_bounce`, `fail`; for checksum failures `report`, `eio`;
//! for torn writes `zero_copy`), `stall_us` (microseconds), `pin_direction`
//! (`DeviceWrite` | `DeviceRead`), `pin_age_us` (microseconds),
//! `overlapping` (request ids), `guest_ranges` (`"0xGPA+0xLEN"`, bytes),
//! `detail` (free text).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::integrity::{hex_crc, ALGORITHM_NAME, SECTORS_PER_BLOCK};

pub mod summary;

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

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Data read (or scrubbed) does not match the stored checksum, after the
    /// R4 recheck.
    ChecksumFailure,
    /// R3: the guest changed a WRITE's buffer while it was under DMA.
    TornWrite,
    /// A block re-checksummed from the image after an unclean shutdown.
    Recovered,
    /// A request touched guest pages still under DMA (R1, R2, long-term pin).
    Conflict,
}

impl EventKind {
    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ChecksumFailure => "checksum_failure",
            EventKind::TornWrite => "torn_write",
            EventKind::Recovered => "recovered",
            EventKind::Conflict => "conflict",
        }
    }
}

/// Request type of the request an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOp {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// Anything else (e.g. the store's recovery at open).
    Other,
}

/// Detection rule that produced an event (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// A WRITE whose source overlaps an in-flight READ's destination.
    R1,
    /// A READ whose destination overlaps an in-flight WRITE's source.
    R2,
    /// Checksum at submission differs from checksum at completion (torn write).
    R3,
    /// Read-time mismatch confirmed by a re-read into a private buffer.
    R4,
    /// A WRITE touching a long-term-pinned page.
    #[serde(rename = "long_term")]
    LongTerm,
}

/// What reached the disk after a torn write (read back at completion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The bytes checksummed at submission.
    SubmittedBytes,
    /// The bytes the guest left in the buffer at completion.
    LaterBytes,
    /// A mix, or something else.
    Neither,
}

/// One report event: one line of the JSON Lines report. Optional fields are
/// omitted from JSON when `None` (or empty). See the module docs for the schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportEvent {
    /// Wall-clock time, RFC 3339 UTC with microseconds.
    pub time: String,
    /// The same instant in seconds since the Unix epoch.
    pub unix_time: f64,
    /// Event kind.
    pub kind: EventKind,
    /// Request id (per device, unique while the process runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// Virtqueue index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u16>,
    /// Request type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<ReportOp>,
    /// First sector concerned, 512-byte units (of the block for checksum
    /// events, of the request for conflicts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sector: Option<u64>,
    /// Length concerned, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Checksum block index, 4 KiB units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    /// Checksum algorithm, `"crc32c"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Expected checksum (what the store holds / was submitted), `"0x%08x"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// Found checksum (what the data has), `"0x%08x"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    /// Detection rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    /// What reached the disk (torn writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Device policy (`passthrough`, `bounce`, `stall`, `fail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// What was done (`reported`, `eio`, `bounced`, `stalled`, `failed`, `recovered`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Time the request stalled, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_us: Option<u64>,
    /// Direction of the conflicting pin (`DeviceWrite` / `DeviceRead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_direction: Option<String>,
    /// Age of the conflicting pin, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_age_us: Option<u64>,
    /// Ids of the overlapping in-flight requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlapping: Vec<u64>,
    /// Guest-physical ranges concerned, `"0xGPA+0xLEN"` (bytes); see [`gpa_range`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_ranges: Vec<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ReportEvent {
    /// An event of `kind` stamped with the current time, every other field empty.
    pub fn new(kind: EventKind) -> ReportEvent {
        let (time, unix_time) = now();
        ReportEvent {
            time,
            unix_time,
            kind,
            request_id: None,
            queue: None,
            op: None,
            sector: None,
            length: None,
            block: None,
            algorithm: None,
            expected: None,
            found: None,
            rule: None,
            outcome: None,
            policy: None,
            action: None,
            stall_us: None,
            pin_direction: None,
            pin_age_us: None,
            overlapping: Vec::new(),
            guest_ranges: Vec::new(),
            detail: None,
        }
    }

    /// An event about one 4 KiB block (`block`, 4 KiB units): fills `block`,
    /// `sector` (= block * 8), `length` (4096 bytes), `algorithm`,
    /// `expected` and `found`.
    pub fn for_block(kind: EventKind, block: u64, expected: u32, found: u32) -> ReportEvent {
        ReportEvent {
            block: Some(block),
            sector: Some(block * SECTORS_PER_BLOCK),
            length: Some(crate::integrity::BLOCK_SIZE),
            algorithm: Some(ALGORITHM_NAME.to_string()),
            expected: Some(hex_crc(expected)),
            found: Some(hex_crc(found)),
            ..ReportEvent::new(kind)
        }
    }
}

/// Formats a guest-physical range as the report writes it: `"0xGPA+0xLEN"`
/// (`gpa` and `len` in bytes).
pub fn gpa_range(gpa: u64, len: u64) -> String {
    format!("{gpa:#x}+{len:#x}")
}

/// Current time as (RFC 3339 UTC with microseconds, Unix seconds with fraction).
pub fn now() -> (String, f64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (rfc3339(d.as_secs(), d.subsec_micros()), d.as_secs_f64())
}

/// Formats Unix seconds + microseconds as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`.
pub fn rfc3339(secs: u64, micros: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One human line for an event, in the spirit of dm-integrity's
/// "Checksum failed at sector 0x…" and btrfs's
/// "csum failed root … ino … off … csum 0x… expected csum 0x… mirror 1"
/// (found first, then expected, as btrfs prints them).
pub fn human_line(e: &ReportEvent) -> String {
    let mut s = String::from("pinblk: ");
    let sector = e.sector.map(|x| format!("{x:#x}")).unwrap_or("?".into());
    let block = e.block.map(|b| format!(" (block {b})")).unwrap_or_default();
    let csums = match (&e.found, &e.expected) {
        (Some(f), Some(x)) => format!(
            " csum {f} expected csum {x} {}",
            e.algorithm.as_deref().unwrap_or(ALGORITHM_NAME)
        ),
        _ => String::new(),
    };
    match e.kind {
        EventKind::ChecksumFailure => {
            let _ = write!(s, "Checksum failed at sector {sector}{block}:{csums}");
        }
        EventKind::TornWrite => {
            let _ = write!(
                s,
                "torn write at sector {sector}{block}: guest changed the buffer under DMA;{csums}"
            );
            if let Some(o) = e.outcome {
                let o = match o {
                    Outcome::SubmittedBytes => "the submitted bytes",
                    Outcome::LaterBytes => "the later bytes",
                    Outcome::Neither => "neither the submitted nor the later bytes",
                };
                let _ = write!(s, "; disk holds {o}");
            }
        }
        EventKind::Recovered => {
            let _ = write!(
                s,
                "recovered block at sector {sector}{block} after an unclean shutdown: stored csum {} replaced by {} from the image",
                e.expected.as_deref().unwrap_or("?"),
                e.found.as_deref().unwrap_or("?")
            );
        }
        EventKind::Conflict => {
            let _ = write!(s, "DMA conflict at sector {sector}{block}");
            if let Some(l) = e.length {
                let _ = write!(s, " len {l}");
            }
            if !e.overlapping.is_empty() {
                let ids: Vec<String> = e.overlapping.iter().map(u64::to_string).collect();
                let _ = write!(s, " overlaps req {}", ids.join(","));
            }
        }
    }
    if let Some(id) = e.request_id {
        let _ = write!(s, "; req {id}");
        if let Some(op) = e.op {
            let _ = write!(s, " {}", serde_plain(&op));
        }
    }
    if let Some(r) = e.rule {
        let _ = write!(s, "; rule {}", serde_plain(&r));
    }
    if let Some(p) = &e.policy {
        let _ = write!(s, "; policy {p}");
    }
    if let Some(a) = &e.action {
        let _ = write!(s, "; action {a}");
    }
    if let Some(st) = e.stall_us {
        let _ = write!(s, "; stalled {st} us");
    }
    if let Some(d) = &e.pin_direction {
        let _ = write!(s, "; pin {d}");
        if let Some(age) = e.pin_age_us {
            let _ = write!(s, " age {age} us");
        }
    }
    if !e.guest_ranges.is_empty() {
        let _ = write!(s, "; gpa {}", e.guest_ranges.join(","));
    }
    if let Some(d) = &e.detail {
        let _ = write!(s, "; {d}");
    }
    s
}

/// A unit enum's serde name (e.g. `Rule::LongTerm` → `long_term`).
fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v)
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// Running counters of integrity events, updated by [`ReportWriter::emit`].
#[derive(Debug, Default)]
pub struct IntegrityCounters {
    checksum_failures: AtomicU64,
    torn_writes: AtomicU64,
    recovered: AtomicU64,
    conflicts: AtomicU64,
    conflicts_by_action: Mutex<BTreeMap<String, u64>>,
}

/// A snapshot of [`IntegrityCounters`], for the shutdown / SIGUSR1 log line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    /// `checksum_failure` events.
    pub checksum_failures: u64,
    /// `torn_write` events.
    pub torn_writes: u64,
    /// `recovered` events (blocks).
    pub recovered: u64,
    /// `conflict` events, all actions.
    pub conflicts: u64,
    /// `conflict` events by action (`"none"` when the event has no action).
    pub conflicts_by_action: BTreeMap<String, u64>,
}

impl IntegrityCounters {
    /// Counts one event.
    pub fn count(&self, e: &ReportEvent) {
        let c = match e.kind {
            EventKind::ChecksumFailure => &self.checksum_failures,
            EventKind::TornWrite => &self.torn_writes,
            EventKind::Recovered => &self.recovered,
            EventKind::Conflict => {
                let action = e.action.clone().unwrap_or_else(|| "none".into());
                *self
                    .conflicts_by_action
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(action)
                    .or_default() += 1;
                &self.conflicts
            }
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            checksum_failures: self.checksum_failures.load(Ordering::Relaxed),
            torn_writes: self.torn_writes.load(Ordering::Relaxed),
            recovered: self.recovered.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            conflicts_by_action: self
                .conflicts_by_action
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Sink of report events: appends JSON Lines to the `--report` file (if
/// any; flushed after every event), logs the human line (`log::warn!`, or
/// `log::info!` for `recovered`) and counts. Thread-safe: share it by `&` or
/// `Arc` between queues.
#[derive(Debug)]
pub struct ReportWriter {
    out: Option<Mutex<BufWriter<File>>>,
    path: Option<PathBuf>,
    counters: IntegrityCounters,
}

impl ReportWriter {
    /// A writer appending to `path` (created if missing), or only logging and
    /// counting when `path` is `None`.
    ///
    /// # Errors
    /// [`ReportError::Io`] if the file cannot be opened for appending.
    pub fn open(path: Option<&Path>) -> Result<ReportWriter, ReportError> {
        let out = match path {
            Some(p) => Some(Mutex::new(BufWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| ReportError::Io {
                        what: "open report",
                        path: p.to_path_buf(),
                        source,
                    })?,
            ))),
            None => None,
        };
        Ok(ReportWriter {
            out,
            path: path.map(Path::to_path_buf),
            counters: IntegrityCounters::default(),
        })
    }

    /// The report file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Counts `e`, logs its human line and appends it as one JSON line,
    /// flushed before returning.
    ///
    /// # Errors
    /// The `io::Error` of writing the report file (the event is still
    /// counted and logged).
    pub fn emit(&self, e: &ReportEvent) -> std::io::Result<()> {
        self.counters.count(e);
        let line = human_line(e);
        if e.kind == EventKind::Recovered {
            log::info!("{line}");
        } else {
            log::warn!("{line}");
        }
        if let Some(out) = &self.out {
            let json = serde_json::to_string(e).map_err(std::io::Error::other)?;
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(json.as_bytes())?;
            w.write_all(b"\n")?;
            w.flush()?;
        }
        Ok(())
    }

    /// The running counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }
}

/// Reads a JSON Lines report: the events that parse, in file order, and the
/// number of non-empty lines that did not (e.g. a line cut short by a crash).
///
/// # Errors
/// [`ReportError::Io`] if the file cannot be read.
pub fn read_report(path: &Path) -> Result<(Vec<ReportEvent>, u64), ReportError> {
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
