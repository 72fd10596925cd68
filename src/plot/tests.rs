//! `pinblk plot` drawn from a recorded report (every fifth event of a
//! `ci/demo` run: passthrough then bounce always), checked by parsing the SVG.

use std::path::Path;

use super::{plot_report, render_svg, PlotError, SIZE};
use crate::report::read_report;

const RECORDED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/plot/testdata/demo-report.jsonl"
);

/// Every `<text>` of the SVG, trimmed, in document order.
fn texts(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).expect("plot output is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.attribute("width"), Some(SIZE.0.to_string().as_str()));
    assert_eq!(root.attribute("height"), Some(SIZE.1.to_string().as_str()));
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| {
            n.descendants()
                .filter(|d| d.is_text())
                .filter_map(|d| d.text())
                .collect::<String>()
                .trim()
                .to_string()
        })
        .collect()
}

fn has(texts: &[String], want: &str) -> bool {
    texts.iter().any(|t| t == want)
}

#[test]
fn recorded_report_renders_with_its_labels() {
    let (events, bad) = read_report(Path::new(RECORDED)).unwrap();
    assert_eq!(bad, 0);
    assert_eq!(events.len(), 45);
    let svg = render_svg(&events, "pinblk run: demo").unwrap();
    let t = texts(&svg);
    for want in [
        "pinblk run: demo",
        "events over time, per queue",
        "seconds since the first event",
        "queue 0",
        "queue 1",
        // Legend: kind and count.
        "conflict (20)",
        "torn_write (15)",
        "checksum_failure (10)",
        // Where the policy changes.
        "policy passthrough",
        "policy bounce",
        "where on the disk: blocks with torn writes and checksum failures",
        "disk offset (MiB)",
        "torn_write",
        "checksum_failure",
        "events by policy and action",
        // One bar per (policy, kind, action), with its count.
        "policy passthrough: conflict -> passthrough",
        "policy passthrough: torn_write -> zero_copy",
        "policy passthrough: checksum_failure -> report",
        "policy bounce: conflict -> bounce",
        "15",
        "10",
    ] {
        assert!(has(&t, want), "no text {want:?} in the SVG; texts: {t:?}");
    }
    // Only the queues there are; no legend entry or bar for a kind the
    // report does not have.
    assert!(!has(&t, "queue 2"), "{t:?}");
    assert!(!t.iter().any(|s| s.starts_with("recovered (")), "{t:?}");
    assert!(!t.iter().any(|s| s.contains("-> fail")), "{t:?}");
    // Policies in the order they appeared: passthrough's bars above bounce's.
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let y_of = |label: &str| -> f64 {
        let n = doc
            .descendants()
            .find(|n| n.has_tag_name("text") && n.text().map(str::trim) == Some(label))
            .unwrap();
        n.attribute("y").unwrap().parse().unwrap()
    };
    assert!(
        y_of("policy passthrough: conflict -> passthrough")
            < y_of("policy bounce: conflict -> bounce")
    );
    // The marks: a circle per event on the time line.
    let circles = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle"))
        .count();
    assert!(
        circles >= events.len(),
        "{circles} circles for {} events",
        events.len()
    );
}

#[test]
fn plot_report_writes_the_file_and_refuses_an_empty_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.svg");
    assert_eq!(plot_report(Path::new(RECORDED), &out).unwrap(), 45);
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(has(
        &texts(&svg),
        "pinblk run: demo-report.jsonl (45 events)"
    ));

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = plot_report(&empty, &out).unwrap_err();
    assert!(matches!(e, PlotError::Empty(_)), "{e}");
    assert!(e.to_string().contains("nothing to draw"), "{e}");

    let missing = dir.path().join("missing.jsonl");
    assert!(matches!(
        plot_report(&missing, &out),
        Err(PlotError::Report(_))
    ));
}
