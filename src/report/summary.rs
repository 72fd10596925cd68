//! Summary of a JSON Lines report for `pinblk report PATH`: totals by kind
//! and action, the worst LBAs, a time line, and what each kind means.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::ReportError;
use super::{read_report, Event, EventKind};

/// How many LBAs [`Summary::worst`] lists at most.
pub const WORST_LBAS: usize = 10;
/// How many rows the time line has at most (buckets widen to fit).
pub const TIMELINE_ROWS: usize = 60;

/// Events at one place on the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LbaCount {
    /// First sector of the place (512-byte units).
    pub sector: u64,
    /// Checksum block (4 KiB units), when the events name one.
    pub block: Option<u64>,
    /// Events at this place.
    pub events: u64,
    /// Events at this place by kind.
    pub by_kind: BTreeMap<EventKind, u64>,
}

/// One bucket of the time line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeBucket {
    /// Bucket start, seconds after the first event.
    pub start_s: f64,
    /// Events in `start_s .. start_s + Summary::bucket_s`.
    pub events: u64,
}

/// What a report holds, summarized (see [`summarize`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Events read.
    pub events: u64,
    /// Non-empty lines that were not valid events.
    pub malformed_lines: u64,
    /// Events by kind.
    pub by_kind: BTreeMap<EventKind, u64>,
    /// Events by kind then action name (`"none"` for `recovered`, which has
    /// no action).
    pub by_kind_action: BTreeMap<EventKind, BTreeMap<&'static str, u64>>,
    /// The places with most events, most first (ties: lowest sector first),
    /// at most [`WORST_LBAS`].
    pub worst: Vec<LbaCount>,
    /// Time of the first event, RFC 3339.
    pub first_time: Option<String>,
    /// Time of the last event, RFC 3339.
    pub last_time: Option<String>,
    /// Width of a time line bucket, seconds (1, doubled until the line has at
    /// most [`TIMELINE_ROWS`] rows).
    pub bucket_s: f64,
    /// Events per bucket from the first event to the last (empty buckets included).
    pub timeline: Vec<TimeBucket>,
}

/// Reads the report at `path` and summarizes it.
///
/// # Errors
/// [`ReportError::Io`] if the file cannot be read (malformed lines are
/// counted, not errors).
pub fn summarize(path: &Path) -> Result<Summary, ReportError> {
    let (events, bad) = read_report(path)?;
    let mut s = summarize_events(&events);
    s.malformed_lines = bad;
    Ok(s)
}

/// Summarizes events already in memory.
pub fn summarize_events(events: &[Event]) -> Summary {
    let mut s = Summary {
        events: events.len() as u64,
        bucket_s: 1.0,
        ..Summary::default()
    };
    let mut places: HashMap<u64, LbaCount> = HashMap::new();
    for e in events {
        let kind = e.kind();
        *s.by_kind.entry(kind).or_default() += 1;
        *s.by_kind_action
            .entry(kind)
            .or_default()
            .entry(e.action_name().unwrap_or("none"))
            .or_default() += 1;
        let (Some(sector), block) = (e.sector(), e.block()) else {
            continue;
        };
        let p = places.entry(sector).or_insert_with(|| LbaCount {
            sector,
            block,
            events: 0,
            by_kind: BTreeMap::new(),
        });
        p.events += 1;
        p.block = p.block.or(block);
        *p.by_kind.entry(kind).or_default() += 1;
    }
    let mut worst: Vec<LbaCount> = places.into_values().collect();
    worst.sort_by(|a, b| b.events.cmp(&a.events).then(a.sector.cmp(&b.sector)));
    worst.truncate(WORST_LBAS);
    s.worst = worst;

    if let (Some(first), Some(last)) = (
        events
            .iter()
            .min_by(|a, b| a.unix_time.total_cmp(&b.unix_time)),
        events
            .iter()
            .max_by(|a, b| a.unix_time.total_cmp(&b.unix_time)),
    ) {
        s.first_time = Some(first.time.clone());
        s.last_time = Some(last.time.clone());
        let span = (last.unix_time - first.unix_time).max(0.0);
        while span / s.bucket_s >= TIMELINE_ROWS as f64 {
            s.bucket_s *= 2.0;
        }
        let rows = (span / s.bucket_s) as usize + 1;
        let mut counts = vec![0u64; rows];
        for e in events {
            let i = (((e.unix_time - first.unix_time) / s.bucket_s) as usize).min(rows - 1);
            counts[i] += 1;
        }
        s.timeline = counts
            .into_iter()
            .enumerate()
            .map(|(i, events)| TimeBucket {
                start_s: i as f64 * s.bucket_s,
                events,
            })
            .collect();
    }
    s
}

/// What each event kind means and what to do about it.
pub fn kind_explanation(kind: EventKind) -> &'static str {
    match kind {
        EventKind::ChecksumFailure => {
            "checksum_failure: a block read back does not match the CRC32C recorded when it was \
             written, and still does not after a re-read into a private buffer (R4). Either the \
             image was changed behind pinblk's back, the storage corrupted it, or an earlier \
             torn write left it so (op `other`: found at start after an unclean stop, outside every \
             write-intent region). `action` says what was done: report (the guest got the data) or eio \
             (--on-mismatch eio: the guest got an I/O error, as under btrfs or dm-integrity). Run `pinblk scrub` offline to list every such block."
        }
        EventKind::TornWrite => {
            "torn_write: the guest changed a WRITE's buffer while the device was reading it (R3: \
             checksum at submission differs from checksum at completion). `outcome` says what \
             reached the disk; `action` is always zero_copy (a bounced write cannot tear). The stored checksum is the submitted one, so a later read of that \
             block fails verification. The guest is modifying pages under DMA (a stable-pages \
             bug or an O_DIRECT scribbler). Only --bounce always prevents it: a scribbled \
             buffer is pinned by no other request, so no policy sees a conflict to act on."
        }
        EventKind::Recovered => {
            "recovered: after an unclean stop (crash, kill -9), a write-intent region that may \
             have had a write in flight held blocks whose data did not match their stored \
             checksums; those checksums were re-computed from the image (one event per region, \
             `blocks` re-learned). Expected after a crash; not a failure. A mismatch outside \
             every such region is reported as a checksum_failure instead."
        }
        EventKind::Migration => {
            "migration: a vhost-user connection whose frontend had dirty logging on \
             (VHOST_F_LOG_ALL) when it stopped its rings ended: it handed the guest over to \
             `destination_connection` (on this host) or to a backend elsewhere. Its requests in \
             flight at the ring stop (`requests_drained`) were completed and unpinned before the \
             switch-over. Expected once per live migration; not a failure."
        }
        EventKind::Conflict => {
            "conflict: a request touched guest pages that were still pinned for DMA by another \
             request (R1: write from pages a read is filling; R2: read into pages a write is \
             sending; long_term: a long-term pin). `action` says what the policy did: \
             passthrough (zero-copy, only reported), bounce, stall (waited for the unpin; \
             stall_us), stall_timeout_bounce, or fail (the guest got an I/O error)."
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pinblk report: {} event(s)", self.events)?;
        if let (Some(a), Some(b)) = (&self.first_time, &self.last_time) {
            writeln!(f, "from {a} to {b}")?;
        }
        if self.malformed_lines > 0 {
            writeln!(
                f,
                "{} malformed line(s) skipped (e.g. cut short by a crash)",
                self.malformed_lines
            )?;
        }
        writeln!(f, "\nTotals by kind and action:")?;
        if self.by_kind.is_empty() {
            writeln!(f, "  none: a clean run")?;
        }
        for (kind, n) in &self.by_kind {
            writeln!(f, "  {kind:<18} {n:>8}")?;
            for (action, m) in self.by_kind_action.get(kind).into_iter().flatten() {
                writeln!(f, "    action {action:<12} {m:>6}")?;
            }
        }
        if !self.worst.is_empty() {
            writeln!(f, "\nWorst LBAs (most events):")?;
            writeln!(
                f,
                "  {:>14} {:>10} {:>7}  kinds",
                "sector", "block", "events"
            )?;
            for w in &self.worst {
                let kinds: Vec<String> =
                    w.by_kind.iter().map(|(k, n)| format!("{k}={n}")).collect();
                let block = w.block.map(|b| b.to_string()).unwrap_or("-".into());
                writeln!(
                    f,
                    "  {:>#14x} {:>10} {:>7}  {}",
                    w.sector,
                    block,
                    w.events,
                    kinds.join(" ")
                )?;
            }
        }
        if !self.timeline.is_empty() {
            writeln!(
                f,
                "\nTime line ({} s per row, from the first event):",
                self.bucket_s
            )?;
            let max = self
                .timeline
                .iter()
                .map(|b| b.events)
                .max()
                .unwrap_or(1)
                .max(1);
            for b in &self.timeline {
                let bar = "#".repeat(((b.events * 50).div_ceil(max)) as usize);
                writeln!(f, "  +{:>8.0}s {:>7} {bar}", b.start_s, b.events)?;
            }
        }
        writeln!(f, "\nWhat the kinds mean:")?;
        for k in EventKind::ALL {
            writeln!(f, "  {}", kind_explanation(k))?;
        }
        Ok(())
    }
}
