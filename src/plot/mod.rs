//! `pinblk plot`: a picture of a run, drawn from its JSON Lines report with
//! the `plotters` crate (SVG backend).
//!
//! Three panels, top to bottom:
//! - **events over time, per queue**: one row per virtqueue, one mark per
//!   event (conflict, torn write, checksum failure) at its time since the
//!   first event; a dashed line and a label where the policy of the events
//!   changes (a restart or a `set-policy`);
//! - **where on the disk**: one row per kind, one mark per event at its disk
//!   offset (the 4 KiB block of a torn write or checksum failure, the first
//!   sector of a conflict's request, a recovered region's start);
//! - **events by policy and action**: one bar per (policy, kind, action).
//!
//! Only main uses this room (level 3: it reads report types, nothing else).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{read_report, Event, EventBody, EventKind, ReportError};

#[cfg(test)]
mod tests;

/// Width and height of the picture, pixels.
pub const SIZE: (u32, u32) = (1200, 1100);

/// Errors of `pinblk plot`.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The report cannot be read.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The report holds no event: there is nothing to draw.
    #[error("{0} holds no report event: nothing to draw (a run without conflicts, torn writes or checksum failures leaves an empty report)")]
    Empty(std::path::PathBuf),
    /// Drawing failed (plotters' error, as text).
    #[error("drawing the picture failed: {0}")]
    Draw(String),
    /// The picture cannot be written.
    #[error("write {path}: {source}; check that its directory exists and is writable")]
    Write {
        /// The output file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the report at `report`, draws it and writes the SVG to `output`.
/// Returns the number of events drawn.
///
/// # Errors
/// [`PlotError`]: the report cannot be read or is empty, or the SVG cannot
/// be written.
pub fn plot_report(report: &Path, output: &Path) -> Result<usize, PlotError> {
    let (events, _bad) = read_report(report)?;
    if events.is_empty() {
        return Err(PlotError::Empty(report.to_path_buf()));
    }
    let title = format!(
        "pinblk run: {} ({} events)",
        report
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        events.len()
    );
    let svg = render_svg(&events, &title)?;
    std::fs::write(output, svg).map_err(|source| PlotError::Write {
        path: output.to_path_buf(),
        source,
    })?;
    Ok(events.len())
}

/// The kinds in the order of the rows and legends.
const KINDS: [EventKind; 4] = [
    EventKind::Conflict,
    EventKind::TornWrite,
    EventKind::ChecksumFailure,
    EventKind::Recovered,
];

/// The colour of a kind's marks.
fn color(kind: EventKind) -> RGBColor {
    match kind {
        EventKind::Conflict => RGBColor(31, 119, 180),
        EventKind::TornWrite => RGBColor(214, 39, 40),
        EventKind::ChecksumFailure => RGBColor(255, 127, 14),
        EventKind::Recovered => RGBColor(44, 160, 44),
        EventKind::Migration => RGBColor(127, 127, 127),
    }
}

/// The row offset of a kind inside a queue's row of the time line.
fn lane(kind: EventKind) -> f64 {
    match kind {
        EventKind::Conflict => 0.25,
        EventKind::TornWrite => 0.0,
        EventKind::ChecksumFailure => -0.25,
        EventKind::Recovered => -0.4,
        EventKind::Migration => 0.4,
    }
}

/// The event's queue, if it has one (`checksum_failure` found at start and
/// `recovered` have none: drawn on queue 0's row).
fn queue(e: &Event) -> Option<u16> {
    match &e.body {
        EventBody::Conflict(c) => Some(c.queue),
        EventBody::TornWrite(t) => Some(t.queue),
        EventBody::ChecksumFailure(c) => c.queue,
        EventBody::Recovered(_) | EventBody::Migration(_) => None,
    }
}

/// The policy the event was handled under (`recovered`: none).
fn policy(e: &Event) -> Option<&'static str> {
    match &e.body {
        EventBody::Conflict(c) => Some(c.policy.name()),
        EventBody::TornWrite(t) => Some(t.policy.name()),
        EventBody::ChecksumFailure(c) => Some(c.policy.name()),
        EventBody::Recovered(_) | EventBody::Migration(_) => None,
    }
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Draws `events` (any order) as an SVG document of [`SIZE`].
///
/// # Errors
/// [`PlotError::Draw`] if plotters fails.
pub fn render_svg(events: &[Event], title: &str) -> Result<String, PlotError> {
    // A migration boundary is about connections, not blocks or requests:
    // not drawn (it is in the report and in `pinblk report`).
    let mut events: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind() != EventKind::Migration)
        .collect();
    events.sort_by(|a, b| a.unix_time.total_cmp(&b.unix_time));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, ("sans-serif", 26)).map_err(draw_err)?;
        let (top, rest) = root.split_vertically(420);
        let (middle, bottom) = rest.split_vertically(300);
        timeline(&top, &events)?;
        lba_map(&middle, &events)?;
        counters(&bottom, &events)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Top panel: events over time, one row per queue.
fn timeline(area: &DrawingArea<SVGBackend, Shift>, events: &[&Event]) -> Result<(), PlotError> {
    let t0 = events.first().map_or(0.0, |e| e.unix_time);
    let t_end = events.last().map_or(0.0, |e| e.unix_time) - t0;
    let queues = events.iter().filter_map(|e| queue(e)).max().unwrap_or(0) as f64 + 1.0;
    let x_max = (t_end * 1.05).max(0.01);
    let mut chart = ChartBuilder::on(area)
        .caption("events over time, per queue", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        // Headroom above the last queue for the legend.
        .build_cartesian_2d(0f64..x_max, -0.5f64..(queues + 0.15))
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first event")
        .y_desc("virtqueue")
        .y_labels((2 * queues as usize + 1).max(3))
        .y_label_formatter(&|y| {
            if (y - y.round()).abs() < 1e-9 && *y >= 0.0 && *y < queues {
                format!("queue {}", y.round() as u64)
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE)
        .draw()
        .map_err(draw_err)?;
    for kind in KINDS {
        let c = color(kind);
        let points: Vec<(f64, f64)> = events
            .iter()
            .filter(|e| e.kind() == kind)
            .map(|e| {
                let q = f64::from(queue(e).unwrap_or(0));
                (e.unix_time - t0, q + lane(kind))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let n = points.len();
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(move |p| Circle::new(p, 3, c.mix(0.7).filled())),
            )
            .map_err(draw_err)?
            .label(format!("{} ({n})", kind.as_str()))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
    }
    // Where the policy changes: a dashed line and the new policy's name.
    let mut last: Option<&str> = None;
    for e in events {
        let Some(p) = policy(e) else { continue };
        if last != Some(p) {
            let x = e.unix_time - t0;
            if last.is_some() {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(x, -0.5), (x, queues + 0.15)],
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(draw_err)?;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("policy {p}"),
                    (x, -0.45),
                    ("sans-serif", 15).into_font().color(&BLACK),
                )))
                .map_err(draw_err)?;
            last = Some(p);
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Middle panel: where on the disk, one row per kind.
fn lba_map(area: &DrawingArea<SVGBackend, Shift>, events: &[&Event]) -> Result<(), PlotError> {
    const MIB: f64 = 1024.0 * 1024.0;
    let offset = |e: &Event| e.sector().unwrap_or(0) as f64 * 512.0 / MIB;
    let lo = events
        .iter()
        .map(|e| offset(e))
        .fold(f64::INFINITY, f64::min);
    let hi = events.iter().map(|e| offset(e)).fold(0.0, f64::max);
    let pad = ((hi - lo) * 0.03).max(0.05);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "where on the disk: blocks with torn writes and checksum failures",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(150)
        .build_cartesian_2d((lo - pad).max(0.0)..(hi + pad), -0.5f64..3.5)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("disk offset (MiB)")
        .y_labels(9)
        .y_label_formatter(&|y| {
            let r = y.round();
            if (y - r).abs() > 1e-9 || !(0.0..=3.0).contains(&r) {
                return String::new();
            }
            KINDS[3 - r as usize].as_str().to_string()
        })
        .light_line_style(WHITE)
        .draw()
        .map_err(draw_err)?;
    for (i, kind) in KINDS.iter().enumerate() {
        let row = (3 - i) as f64;
        let c = color(*kind);
        let points: Vec<(f64, f64)> = events
            .iter()
            .filter(|e| e.kind() == *kind)
            .map(|e| (offset(e), row))
            .collect();
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(move |(x, y)| PathElement::new([(x, y - 0.3), (x, y + 0.3)], c)),
            )
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Bottom panel: events by policy, kind and action.
fn counters(area: &DrawingArea<SVGBackend, Shift>, events: &[&Event]) -> Result<(), PlotError> {
    // Policies in the order they first appear, then kinds, then actions.
    let mut first_seen: Vec<&'static str> = Vec::new();
    let mut by: BTreeMap<(usize, &'static str, EventKind, &'static str), u64> = BTreeMap::new();
    for e in events {
        let p = policy(e).unwrap_or("-");
        let order = match first_seen.iter().position(|q| *q == p) {
            Some(i) => i,
            None => {
                first_seen.push(p);
                first_seen.len() - 1
            }
        };
        let key = (order, p, e.kind(), e.action_name().unwrap_or("-"));
        *by.entry(key).or_default() += 1;
    }
    let rows: Vec<(String, EventKind, u64)> = by
        .into_iter()
        .map(|((_, p, k, a), n)| {
            let label = if k == EventKind::Recovered {
                "recovered".to_string()
            } else {
                format!("policy {p}: {} -> {a}", k.as_str())
            };
            (label, k, n)
        })
        .collect();
    let max = rows.iter().map(|r| r.2).max().unwrap_or(1);
    let n = rows.len() as f64;
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("events by policy and action", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(330)
        .build_cartesian_2d(0f64..(max as f64 * 1.12 + 1.0), -0.5f64..(n - 0.5))
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("events")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(2 * rows.len() + 1)
        .y_label_formatter(&|y| {
            let r = y.round();
            if (y - r).abs() > 1e-9 || r < 0.0 {
                return String::new();
            }
            // Row 0 at the top.
            labels
                .get((n - 1.0 - r) as usize)
                .cloned()
                .unwrap_or_default()
        })
        .light_line_style(WHITE)
        .disable_y_mesh()
        .draw()
        .map_err(draw_err)?;
    for (i, (_, kind, count)) in rows.iter().enumerate() {
        let c = color(*kind);
        let y = n - 1.0 - i as f64;
        let count = *count as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.35), (count, y + 0.35)],
                c.mix(0.8).filled(),
            )))
            .map_err(draw_err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" {count}"),
                (count, y + 0.1),
                ("sans-serif", 15).into_font().color(&BLACK),
            )))
            .map_err(draw_err)?;
    }
    Ok(())
}
