//! Report events the data path emits about requests: conflicts (R1, R2,
//! long-term pins; docs/DESIGN.md §3, §4). Torn writes and checksum failures
//! are built in `integrity.rs`.

use super::job::{lba_blocks, Job};
use crate::device::Device;
use crate::pin::policy::{Action, NoStall};
use crate::pin::{PinConflict, Rule};
use crate::report::{gpa_range, ConflictAction, ConflictEvent, Event, ReportOp};

/// Logs and records a report event; a failing report file is logged, not fatal.
pub(super) fn emit(dev: &Device, e: &Event) {
    if let Err(err) = dev.report().emit(e) {
        log::error!("cannot write report event: {err}");
    }
}

/// The `conflict` event of a request (docs/DESIGN.md §4; fields: README "Report schema").
pub(super) fn conflict_event(
    queue: u16,
    job: &Job,
    conflicts: &[PinConflict],
    dev: &Device,
    action: Action,
    no_stall: Option<NoStall>,
) -> Event {
    let rule = if conflicts.iter().any(|c| c.rule == Rule::LongTerm) {
        Rule::LongTerm
    } else {
        conflicts[0].rule
    };
    let oldest = conflicts
        .iter()
        .max_by_key(|c| c.by.age)
        .expect("non-empty");
    let mut overlapping: Vec<u64> = conflicts.iter().map(|c| c.by.id).collect();
    overlapping.sort_unstable();
    overlapping.dedup();
    let mut guest_ranges: Vec<String> = conflicts
        .iter()
        .flat_map(|c| {
            c.by.overlap
                .iter()
                .map(|r| gpa_range(r.addr, u64::from(r.len)))
        })
        .collect();
    guest_ranges.dedup();
    Event::new(ConflictEvent {
        request_id: job.id,
        queue,
        op: if job.is_write() {
            ReportOp::Write
        } else {
            ReportOp::Read
        },
        sector: job.req.sector().0,
        length: u64::from(job.req.data_len),
        rule,
        policy: dev.policy().policy,
        action: match action {
            Action::ZeroCopy => ConflictAction::Passthrough,
            Action::Bounce => ConflictAction::Bounce,
            Action::Stall => ConflictAction::Stall,
            Action::Fail => ConflictAction::Fail,
        },
        stall_us: None,
        pin_direction: oldest.by.direction,
        pin_age_us: oldest.by.age.as_micros() as u64,
        overlapping,
        lba_overlapping: match (dev.ranges(), lba_blocks(&job.req)) {
            (Some(r), Some((blocks, _))) => r.overlapping(&blocks, job.id),
            _ => Vec::new(),
        },
        guest_ranges,
        detail: no_stall.map(|n| {
            match n {
                NoStall::LongTerm => "not stalling: a conflicting pin is long-term",
                NoStall::Waiting => "not stalling: a conflicting request is itself waiting",
            }
            .into()
        }),
    })
}
