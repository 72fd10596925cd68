//! Log lines rate-limited per kind of message (issue 13, docs/DESIGN.md §11).
//!
//! A frontend controls how often pinblk meets a bad descriptor chain, an
//! address outside guest memory or a ring it cannot use, and each of those
//! is logged. Unlimited, a hostile or looping frontend turns that into a
//! flood (70 MB/s of one line was seen). [`RateLimited`] wraps any
//! [`log::Log`] and lets through, per call site (source file and line, the
//! "kind of message"), one line per interval; the lines held back are
//! counted and reported once the interval is over as one line
//! `"N more like this suppressed in the last 1s: <the first line>"`,
//! either with the next line of that kind or by the ticker thread that
//! [`init`] starts, so that a burst that stops is still accounted for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{Level, Log, Metadata, Record};

/// Default interval: one line per kind of message per second.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Log target of the ring lifecycle lines (a queue started, stopped, with
/// its indices): a restart or a migration produces several within a
/// second, and a test or a person reading the log needs every one of them.
/// Lines of this target get [`RING_ALLOWANCE`] per call site per interval
/// instead of one; only a frontend cycling rings faster than that is
/// summarised.
pub const RING_TARGET: &str = "pinblk::ring";

/// Lines per call site per interval for [`RING_TARGET`].
pub const RING_ALLOWANCE: u64 = 64;

/// What is known of one call site within its current interval.
struct Site {
    /// Start of the interval in which `first` was let through.
    since: Instant,
    /// Lines let through since `since` (1 for most targets, up to
    /// [`RING_ALLOWANCE`] for [`RING_TARGET`]).
    passed: u64,
    /// Lines held back since `since`.
    suppressed: u64,
    /// Level, target and text of the line let through (for the summary).
    level: Level,
    target: String,
    first: String,
}

/// A [`Log`] that lets through one line per call site per `interval` and
/// counts the rest (see the module docs).
pub struct RateLimited<L> {
    inner: L,
    interval: Duration,
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

impl<L: Log> RateLimited<L> {
    /// Wraps `inner`, letting through one line per call site per `interval`.
    pub fn new(inner: L, interval: Duration) -> Self {
        RateLimited {
            inner,
            interval,
            sites: Mutex::new(HashMap::new()),
        }
    }

    /// Emits the "N more suppressed" line of every site whose interval is
    /// over at `now`, and forgets those sites. Called by the ticker thread.
    pub fn flush_expired(&self, now: Instant) {
        let mut summaries = Vec::new();
        {
            let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
            sites.retain(|_, s| {
                if now.duration_since(s.since) < self.interval {
                    return true;
                }
                if s.suppressed > 0 {
                    summaries.push((s.level, s.target.clone(), self.summary(s)));
                }
                false
            });
        }
        for (level, target, text) in summaries {
            self.emit(level, &target, &text);
        }
    }

    fn summary(&self, s: &Site) -> String {
        format!(
            "{} more like this suppressed in the last {}: {}",
            s.suppressed,
            humantime::format_duration(self.interval),
            s.first
        )
    }

    fn emit(&self, level: Level, target: &str, text: &str) {
        self.inner.log(
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{text}"))
                .build(),
        );
    }
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        // A record without a static call site (built by hand) is not limited.
        let (Some(file), Some(line)) = (record.file_static(), record.line()) else {
            self.inner.log(record);
            return;
        };
        let now = Instant::now();
        let mut pending = None;
        {
            let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = sites.get_mut(&(file, line)) {
                if now.duration_since(s.since) < self.interval {
                    let allowance = if record.target() == RING_TARGET {
                        RING_ALLOWANCE
                    } else {
                        1
                    };
                    if s.passed < allowance {
                        s.passed += 1;
                        drop(sites);
                        self.inner.log(record);
                    } else {
                        s.suppressed += 1;
                    }
                    return;
                }
                if s.suppressed > 0 {
                    pending = Some((s.level, s.target.clone(), self.summary(s)));
                }
            }
            sites.insert(
                (file, line),
                Site {
                    since: now,
                    passed: 1,
                    suppressed: 0,
                    level: record.level(),
                    target: record.target().to_string(),
                    first: record.args().to_string(),
                },
            );
        }
        if let Some((level, target, text)) = pending {
            self.emit(level, &target, &text);
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.flush_expired(Instant::now() + self.interval);
        self.inner.flush();
    }
}

/// Installs env_logger (filter from `RUST_LOG`, `info` by default; time
/// stamps in milliseconds) behind
/// [`RateLimited`] as the global logger, with a ticker thread that reports
/// held-back lines once their interval is over.
///
/// # Errors
/// [`log::SetLoggerError`] if a global logger is already installed.
pub fn init() -> Result<(), log::SetLoggerError> {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .build();
    let max = inner.filter();
    let logger = Arc::new(RateLimited::new(inner, DEFAULT_INTERVAL));
    log::set_boxed_logger(Box::new(Shared(logger.clone())))?;
    log::set_max_level(max);
    let weak = Arc::downgrade(&logger);
    drop(logger);
    let _ = std::thread::Builder::new()
        .name("pinblk-log".into())
        .spawn(move || loop {
            std::thread::sleep(DEFAULT_INTERVAL / 4);
            match weak.upgrade() {
                Some(l) => l.flush_expired(Instant::now()),
                None => return,
            }
        });
    Ok(())
}

/// The global logger: a shared [`RateLimited`], also held by the ticker.
struct Shared<L>(Arc<RateLimited<L>>);

impl<L: Log> Log for Shared<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.enabled(metadata)
    }
    fn log(&self, record: &Record) {
        self.0.log(record)
    }
    fn flush(&self) {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects the lines it is given.
    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);

    impl Log for Collect {
        fn enabled(&self, _: &Metadata) -> bool {
            true
        }
        fn log(&self, r: &Record) {
            self.0.lock().unwrap().push(r.args().to_string());
        }
        fn flush(&self) {}
    }

    fn record_at(l: &RateLimited<Collect>, line: u32, text: std::fmt::Arguments<'_>) {
        l.log(
            &Record::builder()
                .level(Level::Warn)
                .target("t")
                .file_static(Some("src/x.rs"))
                .line(Some(line))
                .args(text)
                .build(),
        );
    }

    fn lines(l: &RateLimited<Collect>) -> Vec<String> {
        l.inner.0.lock().unwrap().clone()
    }

    #[test]
    fn one_line_per_site_then_a_count_once_the_interval_is_over() {
        let l = RateLimited::new(Collect::default(), Duration::from_secs(3600));
        for i in 0..1000 {
            record_at(&l, 10, format_args!("bad chain {i}"));
        }
        assert_eq!(lines(&l), vec!["bad chain 0"]);
        l.flush_expired(Instant::now() + Duration::from_secs(3601));
        assert_eq!(
            lines(&l),
            vec![
                "bad chain 0".to_string(),
                "999 more like this suppressed in the last 1h: bad chain 0".to_string()
            ]
        );
        // The site is forgotten: its next line goes through at once.
        record_at(&l, 10, format_args!("bad chain again"));
        assert_eq!(lines(&l).last().unwrap(), "bad chain again");
    }

    /// Ring lifecycle lines: a restart or migration makes several a
    /// second, and every one is needed; only past the allowance are they
    /// counted.
    #[test]
    fn ring_lines_get_their_allowance_per_interval() {
        let l = RateLimited::new(Collect::default(), Duration::from_secs(3600));
        for i in 0..RING_ALLOWANCE + 5 {
            l.log(
                &Record::builder()
                    .level(Level::Info)
                    .target(RING_TARGET)
                    .file_static(Some("src/ring.rs"))
                    .line(Some(7))
                    .args(format_args!("queue 0 stopped {i}"))
                    .build(),
            );
        }
        let got = lines(&l);
        assert_eq!(got.len() as u64, RING_ALLOWANCE);
        assert_eq!(
            got.last().unwrap(),
            &format!("queue 0 stopped {}", RING_ALLOWANCE - 1)
        );
        l.flush_expired(Instant::now() + Duration::from_secs(3601));
        assert_eq!(
            lines(&l).last().unwrap(),
            "5 more like this suppressed in the last 1h: queue 0 stopped 0"
        );
    }

    #[test]
    fn sites_are_limited_separately() {
        let l = RateLimited::new(Collect::default(), Duration::from_secs(3600));
        for _ in 0..10 {
            record_at(&l, 1, format_args!("a"));
            record_at(&l, 2, format_args!("b"));
        }
        assert_eq!(lines(&l), vec!["a", "b"]);
    }

    #[test]
    fn the_next_line_after_the_interval_carries_the_count() {
        let l = RateLimited::new(Collect::default(), Duration::from_millis(20));
        record_at(&l, 5, format_args!("x"));
        record_at(&l, 5, format_args!("x"));
        std::thread::sleep(Duration::from_millis(30));
        record_at(&l, 5, format_args!("y"));
        assert_eq!(
            lines(&l),
            vec![
                "x".to_string(),
                "1 more like this suppressed in the last 20ms: x".to_string(),
                "y".to_string()
            ]
        );
    }

    #[test]
    fn a_site_without_held_back_lines_leaves_no_summary() {
        let l = RateLimited::new(Collect::default(), Duration::from_millis(1));
        record_at(&l, 7, format_args!("once"));
        l.flush_expired(Instant::now() + Duration::from_secs(1));
        assert_eq!(lines(&l), vec!["once"]);
    }
}
