//! Where events go: the JSON Lines file, one human log line each, and the
//! running counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::event::{ChecksumAction, ConflictAction, Event, EventBody, Outcome, TornWriteAction};
use super::ReportError;

/// One human line for an event, in the spirit of dm-integrity's
/// "Checksum failed at sector 0x…" and btrfs's
/// "csum failed root … ino … off … csum 0x… expected csum 0x… mirror 1"
/// (found first, then expected, as btrfs prints them).
pub fn human_line(e: &Event) -> String {
    let mut s = String::from("pinblk: ");
    match &e.body {
        EventBody::ChecksumFailure(c) => {
            let _ = write!(
                s,
                "Checksum failed at sector {:#x} (block {}): csum {} expected csum {} {}",
                c.csum.sector,
                c.csum.block,
                c.csum.found,
                c.csum.expected,
                c.csum.algorithm.name()
            );
            match c.request_id {
                Some(id) => {
                    let _ = write!(s, "; req {id} {}", c.op.name());
                }
                None => {
                    let _ = write!(s, "; {}", c.op.name());
                }
            }
            let _ = write!(s, "; rule {}", c.rule.name());
            let _ = write!(s, "; policy {}", c.policy.name());
            let _ = write!(s, "; action {}", c.action.name());
            push_tail(&mut s, &c.guest_ranges, c.detail.as_deref());
        }
        EventBody::TornWrite(t) => {
            let _ = write!(
                s,
                "torn write at sector {:#x} (block {}): guest changed the buffer under DMA; csum {} expected csum {} {}",
                t.csum.sector,
                t.csum.block,
                t.csum.found,
                t.csum.expected,
                t.csum.algorithm.name()
            );
            let o = match t.outcome {
                Outcome::SubmittedBytes => "the submitted bytes",
                Outcome::LaterBytes => "the later bytes",
                Outcome::Neither => "neither the submitted nor the later bytes",
            };
            let _ = write!(s, "; disk holds {o}");
            let _ = write!(s, "; req {} {}", t.request_id, t.op.name());
            let _ = write!(s, "; rule {}", t.rule.name());
            let _ = write!(s, "; policy {}", t.policy.name());
            let _ = write!(s, "; action {}", t.action.name());
            push_tail(&mut s, &t.guest_ranges, t.detail.as_deref());
        }
        EventBody::Recovered(r) => {
            let _ = write!(
                s,
                "recovered write-intent region {} at sector {:#x} len {} after an unclean stop: {} block(s) re-checksummed from the image, first block {}",
                r.region, r.sector, r.length, r.blocks, r.first_block
            );
            push_tail(&mut s, &[], r.detail.as_deref());
        }
        EventBody::Migration(m) => {
            let _ = write!(
                s,
                "migration: connection {} handed the guest over to {}; {} request(s) in flight at its ring stop completed and unpinned first",
                m.source_connection,
                m.destination_connection
                    .map_or("a backend elsewhere".to_string(), |d| format!("connection {d}")),
                m.requests_drained
            );
            push_tail(&mut s, &[], m.detail.as_deref());
        }
        EventBody::Conflict(c) => {
            let _ = write!(s, "DMA conflict at sector {:#x} len {}", c.sector, c.length);
            if !c.overlapping.is_empty() {
                let ids: Vec<String> = c.overlapping.iter().map(u64::to_string).collect();
                let _ = write!(s, " overlaps req {}", ids.join(","));
            }
            let _ = write!(s, "; req {} {}", c.request_id, c.op.name());
            if !c.lba_overlapping.is_empty() {
                let ids: Vec<String> = c.lba_overlapping.iter().map(u64::to_string).collect();
                let _ = write!(s, "; same LBAs as req {}", ids.join(","));
            }
            let _ = write!(s, "; rule {}", c.rule.name());
            let _ = write!(s, "; policy {}", c.policy.name());
            let _ = write!(s, "; action {}", c.action.name());
            if let Some(st) = c.stall_us {
                let _ = write!(s, "; stalled {st} us");
            }
            let _ = write!(
                s,
                "; pin {} age {} us",
                c.pin_direction.name(),
                c.pin_age_us
            );
            push_tail(&mut s, &c.guest_ranges, c.detail.as_deref());
        }
    }
    s
}

/// Appends the guest ranges and the free text every kind ends with.
fn push_tail(s: &mut String, guest_ranges: &[String], detail: Option<&str>) {
    if !guest_ranges.is_empty() {
        let _ = write!(s, "; gpa {}", guest_ranges.join(","));
    }
    if let Some(d) = detail {
        let _ = write!(s, "; {d}");
    }
}

/// Running counters of report events by kind and action, updated by
/// [`ReportWriter::emit`]. Lock-free: one relaxed atomic per (kind, action).
#[derive(Debug, Default)]
pub struct IntegrityCounters {
    checksum_failures: [AtomicU64; ChecksumAction::ALL.len()],
    torn_writes: [AtomicU64; TornWriteAction::ALL.len()],
    recovered: AtomicU64,
    conflicts: [AtomicU64; ConflictAction::ALL.len()],
    migrations: AtomicU64,
}

/// A snapshot of [`IntegrityCounters`], for the shutdown / SIGUSR1 log line.
/// The `*_by_action` maps hold only actions seen at least once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    /// `checksum_failure` events, all actions.
    pub checksum_failures: u64,
    /// `checksum_failure` events by action.
    pub checksum_failures_by_action: BTreeMap<ChecksumAction, u64>,
    /// `torn_write` events, all actions.
    pub torn_writes: u64,
    /// `torn_write` events by action.
    pub torn_writes_by_action: BTreeMap<TornWriteAction, u64>,
    /// `recovered` events (write-intent regions).
    pub recovered: u64,
    /// `conflict` events, all actions.
    pub conflicts: u64,
    /// `conflict` events by action.
    pub conflicts_by_action: BTreeMap<ConflictAction, u64>,
    /// `migration` events (connections that handed their guest over).
    #[serde(default)]
    pub migrations: u64,
}

impl IntegrityCounters {
    /// Counts one event.
    pub fn count(&self, e: &Event) {
        let c = match &e.body {
            EventBody::ChecksumFailure(c) => &self.checksum_failures[c.action as usize],
            EventBody::TornWrite(t) => &self.torn_writes[t.action as usize],
            EventBody::Recovered(_) => &self.recovered,
            EventBody::Conflict(c) => &self.conflicts[c.action as usize],
            EventBody::Migration(_) => &self.migrations,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> CountersSnapshot {
        fn by_action<A: Copy + Ord, const N: usize>(
            all: [A; N],
            counts: &[AtomicU64; N],
        ) -> (u64, BTreeMap<A, u64>) {
            let map: BTreeMap<A, u64> = all
                .into_iter()
                .zip(counts)
                .map(|(a, c)| (a, c.load(Ordering::Relaxed)))
                .filter(|&(_, n)| n > 0)
                .collect();
            (map.values().sum(), map)
        }
        let (checksum_failures, checksum_failures_by_action) =
            by_action(ChecksumAction::ALL, &self.checksum_failures);
        let (torn_writes, torn_writes_by_action) =
            by_action(TornWriteAction::ALL, &self.torn_writes);
        let (conflicts, conflicts_by_action) = by_action(ConflictAction::ALL, &self.conflicts);
        CountersSnapshot {
            checksum_failures,
            checksum_failures_by_action,
            torn_writes,
            torn_writes_by_action,
            recovered: self.recovered.load(Ordering::Relaxed),
            conflicts,
            conflicts_by_action,
            migrations: self.migrations.load(Ordering::Relaxed),
        }
    }
}

/// Sink of report events: appends JSON Lines to the `--report` file (if
/// any; flushed after every event), logs the human line (`log::warn!`, or
/// `log::info!` for `recovered` and `migration`) and counts. Thread-safe: share it by `&` or
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
    pub fn emit(&self, e: &Event) -> std::io::Result<()> {
        self.counters.count(e);
        let line = human_line(e);
        match e.body {
            EventBody::Recovered(_) | EventBody::Migration(_) => log::info!("{line}"),
            EventBody::Conflict(_) | EventBody::TornWrite(_) | EventBody::ChecksumFailure(_) => {
                log::warn!("{line}")
            }
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

    /// Flushes the report file and makes it durable (`fdatasync`); nothing
    /// to do without a file.
    ///
    /// # Errors
    /// The `io::Error` of the flush or the sync.
    pub fn sync(&self) -> std::io::Result<()> {
        if let Some(out) = &self.out {
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            w.flush()?;
            w.get_ref().sync_data()?;
        }
        Ok(())
    }

    /// The running counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }
}
