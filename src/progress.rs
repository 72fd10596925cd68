//! Progress of long operations (`pinblk scrub`, creating or recovering a
//! checksum store): an `indicatif` bar when stderr is a terminal, a plain
//! line every few seconds when it is not (a log file, CI), nothing when
//! quiet. Plain lines are written to stderr directly, not through the log:
//! the log is rate-limited per call site (`logging`), which would swallow
//! a repeated progress line.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain progress line is printed when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// A progress display for one operation counted in 4 KiB blocks.
pub struct Progress {
    how: How,
}

enum How {
    Quiet,
    Bar(ProgressBar),
    Plain {
        label: String,
        out: Box<dyn Write + Send>,
        every: Duration,
        last: Instant,
        last_done: Option<u64>,
        total: u64,
    },
}

impl Progress {
    /// A bar on a terminal, plain lines every [`PLAIN_EVERY`] otherwise,
    /// nothing if `quiet`. `label` names the operation (e.g. "scrub disk.img").
    pub fn new(label: &str, quiet: bool) -> Progress {
        if quiet {
            return Progress { how: How::Quiet };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent:>3}% {human_pos}/{human_len} blocks of 4 KiB, {eta} left",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(label.to_string());
            return Progress { how: How::Bar(bar) };
        }
        Progress::plain(label, Box::new(std::io::stderr()), PLAIN_EVERY)
    }

    /// Plain lines to `out`, at most one per `every` (and the last one at
    /// [`Progress::finish`]).
    pub fn plain(label: &str, out: Box<dyn Write + Send>, every: Duration) -> Progress {
        Progress {
            how: How::Plain {
                label: label.to_string(),
                out,
                every,
                last: Instant::now(),
                last_done: None,
                total: 0,
            },
        }
    }

    /// `done` of `total` blocks are done.
    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.how {
            How::Quiet => {}
            How::Bar(bar) => {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                }
                bar.set_position(done);
            }
            How::Plain {
                label,
                out,
                every,
                last,
                last_done,
                total: t,
            } => {
                *t = total;
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    *last_done = Some(done);
                    let _ = writeln!(out, "{}", plain_line(label, done, total));
                }
            }
        }
    }

    /// Ends the display: clears the bar; prints the final plain line if the
    /// last one printed was not it (nothing for an operation that never
    /// reported progress).
    pub fn finish(self) {
        match self.how {
            How::Quiet => {}
            How::Bar(bar) => bar.finish_and_clear(),
            How::Plain {
                label,
                mut out,
                last_done,
                total,
                ..
            } => {
                if total > 0 && last_done != Some(total) {
                    let _ = writeln!(out, "{}", plain_line(&label, total, total));
                }
            }
        }
    }
}

fn plain_line(label: &str, done: u64, total: u64) -> String {
    format!(
        "{label}: {:3}% ({done}/{total} blocks of 4 KiB)",
        done * 100 / total.max(1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `Write` whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        }
    }

    #[test]
    fn plain_lines_are_rate_limited_and_end_with_the_total() {
        let out = Shared::default();
        let mut p = Progress::plain("scrub x", Box::new(out.clone()), Duration::from_secs(3600));
        for done in 0..=100_000 {
            p.update(done, 100_000);
        }
        assert!(
            out.lines().is_empty(),
            "nothing before the interval: {:?}",
            out.lines()
        );
        p.finish();
        assert_eq!(
            out.lines(),
            ["scrub x: 100% (100000/100000 blocks of 4 KiB)"]
        );
    }

    #[test]
    fn plain_lines_come_every_interval_without_carriage_returns() {
        let out = Shared::default();
        let mut p = Progress::plain("store", Box::new(out.clone()), Duration::ZERO);
        p.update(1, 4);
        p.update(4, 4);
        p.finish();
        let l = out.lines();
        assert_eq!(
            l,
            [
                "store:  25% (1/4 blocks of 4 KiB)",
                "store: 100% (4/4 blocks of 4 KiB)"
            ]
        );
        assert!(!out.0.lock().unwrap().contains(&b'\r'));
    }

    #[test]
    fn quiet_and_unused_print_nothing() {
        let out = Shared::default();
        Progress::plain("idle", Box::new(out.clone()), Duration::ZERO).finish();
        assert!(out.lines().is_empty());
        let mut q = Progress::new("q", true);
        q.update(1, 2);
        q.finish();
    }
}
