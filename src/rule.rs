//! The detection rules of docs/DESIGN.md §3, shared by the pin model (R1, R2,
//! long-term pins), integrity (R3, R4) and the report.

use serde::{Deserialize, Serialize};

/// A detection rule: why a request or a block was flagged.
///
/// Serialized as `"R1"`, `"R2"`, `"R3"`, `"R4"` and `"long_term"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// R1: a new WRITE whose source pages overlap the destination of an
    /// in-flight READ (a `DeviceWrite` pin that is not long-term).
    /// Kernel counterpart: writeback of a page that `folio_maybe_dma_pinned()`.
    R1,
    /// R2: a new READ whose destination pages overlap the source of an
    /// in-flight WRITE (a `DeviceRead` pin).
    R2,
    /// R3: a zero-copy WRITE whose checksum at submission differs from the
    /// checksum of the same guest bytes at completion (a torn write).
    R3,
    /// R4: a read-time checksum mismatch confirmed by re-reading the block
    /// into a private buffer (dm-integrity's recheck).
    R4,
    /// A WRITE touching a long-term-pinned page of either direction (a pin
    /// older than `--longterm-after`, or registered as long-term). Kernel
    /// counterpart: FOLL_LONGTERM pins (RDMA, io_uring fixed buffers).
    #[serde(rename = "long_term")]
    LongTerm,
}

impl Rule {
    /// Name used in logs and reports: "R1" … "R4" or "long_term".
    pub fn name(&self) -> &'static str {
        match self {
            Rule::R1 => "R1",
            Rule::R2 => "R2",
            Rule::R3 => "R3",
            Rule::R4 => "R4",
            Rule::LongTerm => "long_term",
        }
    }
}
