//! Events not about a request: `recovered` (a write-intent region re-learned
//! when the store is opened after an unclean stop) and `migration` (a
//! vhost-user connection handed its guest over to another).

use serde::{Deserialize, Serialize};

use super::event::ReportOp;
use crate::integrity::RecoveredRegion;

/// `kind: "recovered"`: a write-intent region marked at an unclean stop (a
/// write may have been in flight there) in which blocks disagreed with the
/// image when the store was opened; their stored checksums were replaced by
/// those of the image's data. One event per region. Not about a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveredEvent {
    /// Always [`ReportOp::Other`].
    pub op: ReportOp,
    /// First sector of the region, 512-byte units.
    pub sector: u64,
    /// Length of the region, bytes (1 MiB; less for the image's last region).
    pub length: u64,
    /// Region index (units of the region size).
    pub region: u64,
    /// Number of blocks re-checksummed from the image.
    pub blocks: u64,
    /// First block re-checksummed, 4 KiB units.
    pub first_block: u64,
    /// Every block re-checksummed, 4 KiB units, ascending (at most 256 for
    /// a 1 MiB region).
    pub block_list: Vec<u64>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RecoveredEvent {
    /// The event for a region recovered at open.
    pub fn new(r: &RecoveredRegion) -> RecoveredEvent {
        RecoveredEvent {
            op: ReportOp::Other,
            sector: r.first_sector,
            length: r.len_bytes,
            region: r.region,
            blocks: r.blocks.len() as u64,
            first_block: r.blocks.first().copied().unwrap_or_default(),
            block_list: r.blocks.clone(),
            detail: Some(
                "unclean stop: a write may have been in flight in this write-intent region; its blocks that disagreed with the image were re-checksummed from the image"
                    .into(),
            ),
        }
    }
}

/// `kind: "migration"`: the boundary of a live migration as pinblk sees it
/// (docs/DESIGN.md §13). A connection whose frontend had dirty logging on
/// (VHOST_F_LOG_ALL; vhost-user spec, "Migration") when it stopped its
/// rings, and did not start them again, ended: it handed the guest over.
/// Emitted when that connection has ended and its queues are drained. Its
/// requests in flight at the ring stop (GET_VRING_BASE) were completed into
/// its used rings, and their pins released, before the answer; nothing of
/// it is in flight any more.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationEvent {
    /// The source: the connection that handed the guest over (connections
    /// are numbered from 1 in the order pinblk accepted them).
    pub source_connection: u64,
    /// The destination on this host: the newest connection accepted while
    /// the source was served (the destination QEMU connects to the same
    /// socket before the migration). Omitted when there is none: the
    /// destination is elsewhere (another pinblk on shared storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_connection: Option<u64>,
    /// Requests in flight on the source when its rings were stopped,
    /// completed (and unpinned) by the drain before the rings' state went to
    /// the frontend.
    pub requests_drained: u64,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl MigrationEvent {
    /// The boundary between connection `source` and connection
    /// `destination` (`None`: not on this host), `drained` requests
    /// completed by the source's ring stops.
    pub fn new(source: u64, destination: Option<u64>, drained: u64) -> MigrationEvent {
        MigrationEvent {
            source_connection: source,
            destination_connection: destination,
            requests_drained: drained,
            detail: Some(
                "dirty logging was on when the source stopped its rings; what it wrote to guest memory is in the frontend's dirty log"
                    .into(),
            ),
        }
    }
}
