//! The report event types: an [`Event`] is a time stamp plus one
//! [`EventBody`] variant per kind, each holding exactly the fields that kind
//! has. Serialized, an event is one flat JSON object (`time`, `unix_time`,
//! `kind`, then the kind's fields); see the module docs of
//! [`crate::report`] for the schema.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::integrity::{hex_crc, ALGORITHM_NAME, BLOCK_SIZE, SECTORS_PER_BLOCK};

pub use super::lifecycle::{MigrationEvent, RecoveredEvent};
use crate::pin::policy::Policy;
use crate::pin::Direction;
use crate::rule::Rule;

/// One report event: one line of the JSON Lines report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, RFC 3339 UTC with microseconds.
    pub time: String,
    /// The same instant in seconds since the Unix epoch (with fraction).
    pub unix_time: f64,
    /// What happened; its `kind` and fields are flattened into the event.
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// An event with `body`, stamped with the current time.
    pub fn new(body: impl Into<EventBody>) -> Event {
        let (time, unix_time) = now();
        Event {
            time,
            unix_time,
            body: body.into(),
        }
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// First sector concerned, 512-byte units (`None` for `migration`,
    /// which is about connections, not the disk).
    pub fn sector(&self) -> Option<u64> {
        match &self.body {
            EventBody::Conflict(e) => Some(e.sector),
            EventBody::TornWrite(e) => Some(e.csum.sector),
            EventBody::ChecksumFailure(e) => Some(e.csum.sector),
            EventBody::Recovered(e) => Some(e.sector),
            EventBody::Migration(_) => None,
        }
    }

    /// Checksum block concerned, 4 KiB units (`None` for conflicts, which
    /// are about a request's whole range; the first block re-learned for
    /// `recovered`).
    pub fn block(&self) -> Option<u64> {
        match &self.body {
            EventBody::Conflict(_) => None,
            EventBody::TornWrite(e) => Some(e.csum.block),
            EventBody::ChecksumFailure(e) => Some(e.csum.block),
            EventBody::Recovered(e) => Some(e.first_block),
            EventBody::Migration(_) => None,
        }
    }

    /// What was done, as the `action` field names it (`None` for `recovered`
    /// and `migration`, which have no action).
    pub fn action_name(&self) -> Option<&'static str> {
        match &self.body {
            EventBody::Conflict(e) => Some(e.action.name()),
            EventBody::TornWrite(e) => Some(e.action.name()),
            EventBody::ChecksumFailure(e) => Some(e.action.name()),
            EventBody::Recovered(_) | EventBody::Migration(_) => None,
        }
    }
}

/// What happened: one variant per `kind`, each with exactly that kind's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A request touched guest pages still under DMA (R1, R2, long-term pin).
    Conflict(ConflictEvent),
    /// R3: the guest changed a WRITE's buffer while it was under DMA.
    TornWrite(TornWriteEvent),
    /// Data read does not match the stored checksum, after the R4 recheck.
    ChecksumFailure(ChecksumFailureEvent),
    /// A write-intent region whose blocks were re-checksummed from the image
    /// after an unclean stop.
    Recovered(RecoveredEvent),
    /// A connection handed its guest over to another (live migration).
    Migration(MigrationEvent),
}

impl EventBody {
    /// The body's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::Conflict(_) => EventKind::Conflict,
            EventBody::TornWrite(_) => EventKind::TornWrite,
            EventBody::ChecksumFailure(_) => EventKind::ChecksumFailure,
            EventBody::Recovered(_) => EventKind::Recovered,
            EventBody::Migration(_) => EventKind::Migration,
        }
    }
}

impl From<ConflictEvent> for EventBody {
    fn from(e: ConflictEvent) -> Self {
        EventBody::Conflict(e)
    }
}

impl From<TornWriteEvent> for EventBody {
    fn from(e: TornWriteEvent) -> Self {
        EventBody::TornWrite(e)
    }
}

impl From<ChecksumFailureEvent> for EventBody {
    fn from(e: ChecksumFailureEvent) -> Self {
        EventBody::ChecksumFailure(e)
    }
}

impl From<RecoveredEvent> for EventBody {
    fn from(e: RecoveredEvent) -> Self {
        EventBody::Recovered(e)
    }
}

impl From<MigrationEvent> for EventBody {
    fn from(e: MigrationEvent) -> Self {
        EventBody::Migration(e)
    }
}

/// The `kind` of an event, without its fields (for counting and summaries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// [`EventBody::ChecksumFailure`].
    ChecksumFailure,
    /// [`EventBody::TornWrite`].
    TornWrite,
    /// [`EventBody::Recovered`].
    Recovered,
    /// [`EventBody::Conflict`].
    Conflict,
    /// [`EventBody::Migration`].
    Migration,
}

impl EventKind {
    /// Every kind, in the order summaries list them.
    pub const ALL: [EventKind; 5] = [
        EventKind::ChecksumFailure,
        EventKind::TornWrite,
        EventKind::Recovered,
        EventKind::Conflict,
        EventKind::Migration,
    ];

    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ChecksumFailure => "checksum_failure",
            EventKind::TornWrite => "torn_write",
            EventKind::Recovered => "recovered",
            EventKind::Conflict => "conflict",
            EventKind::Migration => "migration",
        }
    }
}

/// `kind: "conflict"`: a READ or WRITE touched guest pages still pinned for
/// DMA by another request (R1, R2) or by a long-term pin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictEvent {
    /// Request id (per device, unique while the process runs).
    pub request_id: u64,
    /// Virtqueue index.
    pub queue: u16,
    /// [`ReportOp::Read`] or [`ReportOp::Write`].
    pub op: ReportOp,
    /// First sector of the request, 512-byte units.
    pub sector: u64,
    /// Length of the request's data, bytes.
    pub length: u64,
    /// [`Rule::R1`], [`Rule::R2`] or [`Rule::LongTerm`] (long-term wins when
    /// several conflicts apply).
    pub rule: Rule,
    /// The device's `--policy`.
    pub policy: Policy,
    /// What was done.
    pub action: ConflictAction,
    /// Time the request stalled, microseconds: present exactly when `action`
    /// is [`ConflictAction::Stall`] or [`ConflictAction::StallTimeoutBounce`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_us: Option<u64>,
    /// Direction of the oldest conflicting pin.
    pub pin_direction: Direction,
    /// Age of the oldest conflicting pin, microseconds.
    pub pin_age_us: u64,
    /// Ids of the conflicting in-flight requests, ascending, no duplicates
    /// (omitted when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlapping: Vec<u64>,
    /// Ids of the other in-flight requests on overlapping LBAs (legal, and
    /// ordered by the range locks; docs/DESIGN.md §7), when the request also
    /// overlaps some on the image; omitted when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lba_overlapping: Vec<u64>,
    /// Guest-physical ranges of the overlap, `"0xGPA+0xLEN"` (bytes; see
    /// [`gpa_range`]; omitted when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_ranges: Vec<String>,
    /// Free text, e.g. why the stall policy did not stall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The checksum fields of an event about one block (`torn_write`,
/// `checksum_failure`), flattened into the event: where, how
/// long, which block, and the two checksums in btrfs order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockCsum {
    /// First sector, 512-byte units.
    pub sector: u64,
    /// Length, bytes.
    pub length: u64,
    /// Checksum block, 4 KiB units.
    pub block: u64,
    /// Checksum algorithm.
    pub algorithm: Algorithm,
    /// The checksum the data should have (stored or submitted).
    pub expected: Crc,
    /// The checksum the data has.
    pub found: Crc,
}

impl BlockCsum {
    /// The fields for the whole 4 KiB checksum block `block`: `sector` =
    /// `block * 8`, `length` 4096, CRC32C `expected` and `found`.
    pub fn of_block(block: u64, expected: u32, found: u32) -> BlockCsum {
        BlockCsum {
            sector: block * SECTORS_PER_BLOCK,
            length: BLOCK_SIZE,
            block,
            algorithm: Algorithm::Crc32c,
            expected: Crc(expected),
            found: Crc(found),
        }
    }
}

/// `kind: "torn_write"` (R3): a zero-copy WRITE whose buffer changed between
/// submission and completion, one event per changed 4 KiB chunk of the
/// request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TornWriteEvent {
    /// Request id.
    pub request_id: u64,
    /// Virtqueue index.
    pub queue: u16,
    /// Always [`ReportOp::Write`].
    pub op: ReportOp,
    /// The chunk: its first sector (the request's sector plus a multiple of
    /// 8, so it need not be `block * 8`), its length (4096, or less for the
    /// request's last chunk), the block it starts in; `expected` is its
    /// checksum at submission (what the store now holds), `found` the
    /// checksum of what reached the disk (read back at completion).
    #[serde(flatten)]
    pub csum: BlockCsum,
    /// Always [`Rule::R3`].
    pub rule: Rule,
    /// What reached the disk.
    pub outcome: Outcome,
    /// The device's `--policy`.
    pub policy: Policy,
    /// What was done.
    pub action: TornWriteAction,
    /// Guest-physical ranges of the chunk, `"0xGPA+0xLEN"` (bytes; omitted
    /// when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_ranges: Vec<String>,
    /// Free text: both checksums of the guest buffer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `kind: "checksum_failure"` (R4): a block read does not match its stored
/// checksum, and still does not when re-read into a private buffer; or a
/// block found mismatching at start after an unclean stop, outside every
/// write-intent region ([`ChecksumFailureEvent::at_start`]: no request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChecksumFailureEvent {
    /// Request id (omitted when not about a request: found at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// Virtqueue index (omitted when not about a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u16>,
    /// [`ReportOp::Read`], or [`ReportOp::Other`] when found at start.
    pub op: ReportOp,
    /// The block (`sector` = `block * 8`, `length` 4096, also for a shorter
    /// last block); `expected` is the stored checksum, `found` the checksum
    /// of the block as re-read from the image.
    #[serde(flatten)]
    pub csum: BlockCsum,
    /// Always [`Rule::R4`].
    pub rule: Rule,
    /// The device's `--policy`.
    pub policy: Policy,
    /// What was done (`--on-mismatch` for a READ; always
    /// [`ChecksumAction::Report`] when found at start).
    pub action: ChecksumAction,
    /// Guest-physical ranges the block was read into, `"0xGPA+0xLEN"`
    /// (bytes; omitted when empty, as for one found at start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_ranges: Vec<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ChecksumFailureEvent {
    /// The event for block `block` (4 KiB units) found at start, after an
    /// unclean stop, with checksum `found` while the store holds `expected`,
    /// outside every write-intent region; `policy` is the device's.
    pub fn at_start(block: u64, expected: u32, found: u32, policy: Policy) -> ChecksumFailureEvent {
        ChecksumFailureEvent {
            request_id: None,
            queue: None,
            op: ReportOp::Other,
            csum: BlockCsum::of_block(block, expected, found),
            rule: Rule::R4,
            policy,
            action: ChecksumAction::Report,
            guest_ranges: Vec::new(),
            detail: Some(
                "found at start after an unclean stop, outside every write-intent region: no write was in flight there"
                    .into(),
            ),
        }
    }
}

/// What the data path did with a conflicting request (`action` of a `conflict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictAction {
    /// Zero-copy anyway, only reported (`--policy passthrough`).
    Passthrough,
    /// Through a private buffer (`--policy bounce`, or `stall` when it
    /// cannot stall, or `passthrough` with `--bounce always` for a WRITE).
    Bounce,
    /// Waited until the conflicting pins were released, then zero-copy.
    Stall,
    /// Waited `--stall-timeout` (or until teardown), then bounced.
    StallTimeoutBounce,
    /// Completed with VIRTIO_BLK_S_IOERR (`--policy fail`).
    Fail,
}

impl ConflictAction {
    /// Every action.
    pub const ALL: [ConflictAction; 5] = [
        ConflictAction::Passthrough,
        ConflictAction::Bounce,
        ConflictAction::Stall,
        ConflictAction::StallTimeoutBounce,
        ConflictAction::Fail,
    ];

    /// The snake_case name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ConflictAction::Passthrough => "passthrough",
            ConflictAction::Bounce => "bounce",
            ConflictAction::Stall => "stall",
            ConflictAction::StallTimeoutBounce => "stall_timeout_bounce",
            ConflictAction::Fail => "fail",
        }
    }
}

/// What was done about a torn write (`action` of a `torn_write`). A bounced
/// WRITE cannot tear, so only zero-copy writes are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TornWriteAction {
    /// The WRITE went zero-copy from guest memory (nothing else is done: the
    /// event only reports).
    ZeroCopy,
}

impl TornWriteAction {
    /// Every action.
    pub const ALL: [TornWriteAction; 1] = [TornWriteAction::ZeroCopy];

    /// The snake_case name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            TornWriteAction::ZeroCopy => "zero_copy",
        }
    }
}

/// What was done about a checksum failure (`action` of a
/// `checksum_failure`, from `--on-mismatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumAction {
    /// Only reported; the guest got the data.
    Report,
    /// The READ completed with VIRTIO_BLK_S_IOERR.
    Eio,
}

impl ChecksumAction {
    /// Every action.
    pub const ALL: [ChecksumAction; 2] = [ChecksumAction::Report, ChecksumAction::Eio];

    /// The snake_case name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumAction::Report => "report",
            ChecksumAction::Eio => "eio",
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
    /// Not a request (the store's recovery at open).
    Other,
}

impl ReportOp {
    /// The snake_case name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ReportOp::Read => "read",
            ReportOp::Write => "write",
            ReportOp::Flush => "flush",
            ReportOp::Discard => "discard",
            ReportOp::WriteZeroes => "write_zeroes",
            ReportOp::GetId => "get_id",
            ReportOp::Other => "other",
        }
    }
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

/// Checksum algorithm of the block events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// CRC32C (Castagnoli), as btrfs and dm-integrity use it.
    Crc32c,
}

impl Algorithm {
    /// The name used in JSON and logs.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32c => ALGORITHM_NAME,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A CRC32C checksum, serialized as the string `"0x%08x"` (8 lowercase hex
/// digits); [`fmt::Display`] prints it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Crc(pub u32);

impl fmt::Display for Crc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&hex_crc(self.0))
    }
}

impl Serialize for Crc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex_crc(self.0))
    }
}

impl<'de> Deserialize<'de> for Crc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Crc, D::Error> {
        let s = String::deserialize(d)?;
        s.strip_prefix("0x")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .map(Crc)
            .ok_or_else(|| serde::de::Error::custom(format!("checksum {s:?} is not 0x%08x")))
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
