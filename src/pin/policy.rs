//! What the data path does with a request that touches guest pages still
//! under DMA (docs/DESIGN.md §4): the decision only; the worker carries it out.

use std::time::Duration;

use crate::pin::PinConflict;

/// `--policy`: the per-device answer to a conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Zero-copy always; conflicts are only detected and reported (what a
    /// QEMU `cache=none` guest on btrfs or dm-integrity sees).
    Passthrough,
    /// Copy a conflicting WRITE's data to a private buffer first and write the
    /// copy; land a conflicting READ in a private buffer copied to the guest
    /// at completion (kernel: block/bounce.c, Jan Kara's "bounce pinned pages").
    Bounce,
    /// Hold the conflicting request until the conflicting pins are released,
    /// bounded by `--stall-timeout`, then bounce (kernel: folio_wait_stable(),
    /// "wait for the unpin").
    Stall,
    /// Complete the conflicting request with VIRTIO_BLK_S_IOERR.
    Fail,
}

impl Policy {
    /// Name used in logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Passthrough => "passthrough",
            Policy::Bounce => "bounce",
            Policy::Stall => "stall",
            Policy::Fail => "fail",
        }
    }
}

/// `--bounce`: which writes are copied before they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BounceMode {
    /// Only writes the policy decides to bounce.
    Conflicts,
    /// Every write (full stable-pages protection, at memcpy cost).
    Always,
}

/// The pin-model settings of a device.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// What to do on a conflict.
    pub policy: Policy,
    /// Copy every WRITE (`--bounce always`).
    pub bounce_always: bool,
    /// Longest stall before falling back to bounce.
    pub stall_timeout: Duration,
    /// Fault injection: hold READ completions (and so their pins) this long.
    pub read_delay: Option<Duration>,
    /// Probability (0..=1) that a READ gets `read_delay`.
    pub read_delay_probability: f64,
    /// Bytes of bounce buffers the device may hold at once (all queues).
    pub bounce_pool_bytes: u64,
    /// Bytes of bounce buffers one queue may hold at once (`--bounce-queue-max`).
    /// A request larger than this or than the pool is never bounced (IOERR).
    pub bounce_queue_bytes: u64,
}

impl PolicyConfig {
    /// Which writes are bounced, as `--bounce` names it (`bounce_always`).
    pub fn bounce_mode(&self) -> BounceMode {
        if self.bounce_always {
            BounceMode::Always
        } else {
            BounceMode::Conflicts
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            policy: Policy::Bounce,
            bounce_always: false,
            stall_timeout: Duration::from_millis(100),
            read_delay: None,
            read_delay_probability: 1.0,
            bounce_pool_bytes: 64 << 20,
            bounce_queue_bytes: 32 << 20,
        }
    }
}

/// What the worker does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// DMA straight into / out of guest memory.
    ZeroCopy,
    /// Through a private buffer.
    Bounce,
    /// Park until the conflicting pins are released (or the stall times out).
    Stall,
    /// Complete with IOERR.
    Fail,
}

/// Why the stall policy did not stall, if it did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoStall {
    /// A conflicting pin is long-term: waiting could take forever.
    LongTerm,
    /// A conflicting request is not submitted yet (itself waiting): waiting on
    /// it could close a wait cycle.
    Waiting,
}

/// Decides what to do with a request given its conflicts (empty: none).
/// `is_write` tells a WRITE (VIRTIO_BLK_T_OUT) from a READ.
pub fn decide(
    cfg: &PolicyConfig,
    is_write: bool,
    conflicts: &[PinConflict],
) -> (Action, Option<NoStall>) {
    if conflicts.is_empty() {
        let a = if is_write && cfg.bounce_always {
            Action::Bounce
        } else {
            Action::ZeroCopy
        };
        return (a, None);
    }
    match cfg.policy {
        Policy::Passthrough if is_write && cfg.bounce_always => (Action::Bounce, None),
        Policy::Passthrough => (Action::ZeroCopy, None),
        Policy::Bounce => (Action::Bounce, None),
        Policy::Fail => (Action::Fail, None),
        Policy::Stall => {
            if conflicts.iter().any(|c| c.by.long_term) {
                (Action::Bounce, Some(NoStall::LongTerm))
            } else if conflicts.iter().any(|c| !c.by.submitted) {
                (Action::Bounce, Some(NoStall::Waiting))
            } else {
                (Action::Stall, None)
            }
        }
    }
}
