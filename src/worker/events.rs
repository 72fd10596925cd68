//! Report events the data path emits about requests: conflicts (R1, R2,
//! long-term pins; docs/DESIGN.md §3, §4). Torn writes and checksum failures
//! are built in `integrity.rs`.

use super::job::Job;
use crate::device::Device;
use crate::pin::policy::{Action, NoStall};
use crate::pin::{PinConflict, Rule as PinRule};
use crate::report::{gpa_range, EventKind, ReportEvent, ReportOp, Rule as ReportRule};

/// Logs and records a report event; a failing report file is logged, not fatal.
pub(super) fn emit(dev: &Device, e: &ReportEvent) {
    if let Err(err) = dev.report().emit(e) {
        log::error!("cannot write report event: {err}");
    }
}

/// The `conflict` event of a request (DESIGN.md "Checksums and reports").
pub(super) fn conflict_event(
    queue: u16,
    job: &Job,
    conflicts: &[PinConflict],
    dev: &Device,
    action: Action,
    no_stall: Option<NoStall>,
) -> ReportEvent {
    let mut e = ReportEvent::new(EventKind::Conflict);
    e.request_id = Some(job.id);
    e.queue = Some(queue);
    e.op = Some(if job.is_write() {
        ReportOp::Write
    } else {
        ReportOp::Read
    });
    e.sector = Some(job.req.sector().0);
    e.length = Some(u64::from(job.req.data_len));
    let rule = if conflicts.iter().any(|c| c.rule == PinRule::LongTerm) {
        ReportRule::LongTerm
    } else if conflicts[0].rule == PinRule::R1 {
        ReportRule::R1
    } else {
        ReportRule::R2
    };
    e.rule = Some(rule);
    e.policy = Some(dev.policy().policy.name().into());
    let action = match action {
        Action::ZeroCopy => "passthrough",
        Action::Bounce => "bounce",
        Action::Stall => "stall",
        Action::Fail => "fail",
    };
    e.action = Some(action.into());
    let oldest = conflicts
        .iter()
        .max_by_key(|c| c.by.age)
        .expect("non-empty");
    e.pin_direction = Some(oldest.by.direction.name().into());
    e.pin_age_us = Some(oldest.by.age.as_micros() as u64);
    let mut ids: Vec<u64> = conflicts.iter().map(|c| c.by.id).collect();
    ids.sort_unstable();
    ids.dedup();
    e.overlapping = ids;
    let mut ranges: Vec<String> = conflicts
        .iter()
        .flat_map(|c| {
            c.by.overlap
                .iter()
                .map(|r| gpa_range(r.addr, u64::from(r.len)))
        })
        .collect();
    ranges.dedup();
    e.guest_ranges = ranges;
    e.detail = no_stall.map(|n| {
        match n {
            NoStall::LongTerm => "not stalling: a conflicting pin is long-term",
            NoStall::Waiting => "not stalling: a conflicting request is itself waiting",
        }
        .into()
    });
    e
}
