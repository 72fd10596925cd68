//! The control socket of a running `pinblk serve --control PATH`, driven by
//! `pinblk ctl` and by raw lines while a libblkio client does I/O: a policy
//! change takes effect for the next conflicts with no request lost or
//! failed, and bad input gets error replies without disturbing I/O.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blkio::ReqFlags;
use common::{ctl, events, pattern, Client, Server};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The READ of a conflict round reads this block into buffer B...
const SRC: u64 = MIB;
/// ...while a WRITE writes B here (R1).
const DST: u64 = 2 * MIB;
/// Blocks written with a pattern and read back, beside the conflicts.
const CHECKED: u64 = 4 * MIB;

fn start(dir: &tempfile::TempDir) -> (Server, PathBuf, PathBuf) {
    let d = tempfile::tempdir_in(dir.path()).unwrap();
    let ctl = d.path().join("ctl.sock");
    let report = d.path().join("report.jsonl");
    let image = d.path().join("disk.img");
    let (ctl_s, report_s) = (
        ctl.to_str().unwrap().to_string(),
        report.to_str().unwrap().to_string(),
    );
    let srv = Server::start_in(
        d,
        image,
        &["--size", &(16 * MIB).to_string()],
        &[
            "--num-queues",
            "2",
            "--policy",
            "passthrough",
            "--inject-read-delay",
            "60ms",
            "--control",
            &ctl_s,
            "--report",
            &report_s,
        ],
    );
    for _ in 0..100 {
        if ctl.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (srv, ctl, report)
}

/// What the I/O thread did.
#[derive(Default)]
struct IoResult {
    requests: u64,
    failed: Vec<String>,
}

/// Until `stop` (and at least `min_rounds`): a conflict round (a delayed
/// READ into B on queue 0, a WRITE from B on queue 1) and a pattern
/// written and read back on queue 1, every status checked.
fn io_loop(socket: PathBuf, stop: Arc<AtomicBool>, min_rounds: u64) -> IoResult {
    let mut c = Client::connect(&socket, 2, MIB as usize).unwrap();
    let mut r = IoResult::default();
    let mut round = 0u64;
    while round < min_rounds || !stop.load(Ordering::Acquire) {
        let b = c.ptr(0);
        c.queues[0].read(SRC, b, 4096, 1, ReqFlags::empty());
        let mut none = [std::mem::MaybeUninit::uninit()];
        let mut t = Duration::from_millis(0);
        let _ = c.queues[0].do_io(&mut none, 0, Some(&mut t), None);
        std::thread::sleep(Duration::from_millis(10));
        let w = c.write(1, DST, 0, 4096);
        let rd = c.wait(0);
        r.requests += 2;
        if w != 0 || rd != 0 {
            r.failed
                .push(format!("round {round}: conflict write {w}, read {rd}"));
        }
        let data = pattern(round, 8192);
        let off = CHECKED + (round % 64) * 8192;
        c.buf()[65536..65536 + 8192].copy_from_slice(&data);
        let w = c.write(1, off, 65536, 8192);
        c.buf()[131072..131072 + 8192].fill(0);
        let rd = c.read(1, off, 131072, 8192);
        r.requests += 2;
        if w != 0 || rd != 0 || c.buf()[131072..131072 + 8192] != data[..] {
            r.failed.push(format!(
                "round {round}: checked write {w}, read {rd}, data equal: {}",
                c.buf()[131072..131072 + 8192] == data[..]
            ));
        }
        round += 1;
    }
    assert_eq!(c.flush(0), 0);
    r
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn conflicts(report: &Path) -> Vec<Value> {
    events(report)
        .into_iter()
        .filter(|e| e["kind"] == "conflict")
        .collect()
}

#[test]
fn set_policy_under_io_applies_to_the_next_conflicts_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, ctl_sock, report) = start(&dir);
    let (ok, v, err) = ctl(&ctl_sock, &["query-config"]);
    assert!(ok, "{err}");
    assert_eq!(v["policy"], "passthrough");

    let stop = Arc::new(AtomicBool::new(false));
    let io = {
        let (s, st) = (srv.socket.clone(), stop.clone());
        std::thread::spawn(move || io_loop(s, st, 8))
    };
    // Some conflicts under passthrough first.
    for _ in 0..200 {
        if conflicts(&report).len() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, v, err) = ctl(&ctl_sock, &["set-policy", "policy=bounce"]);
    let switched = now();
    assert!(ok, "{err}");
    assert_eq!(v["policy"], "bounce");
    // Some conflicts after it.
    for _ in 0..200 {
        if conflicts(&report)
            .iter()
            .filter(|e| e["unix_time"].as_f64().unwrap() > switched)
            .count()
            >= 3
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Release);
    let r = io.join().unwrap();
    assert!(r.failed.is_empty(), "failed requests: {:?}", r.failed);

    let (ok, stats, err) = ctl(&ctl_sock, &["query-stats"]);
    assert!(ok, "{err}");
    let c = conflicts(&report);
    let before: Vec<&Value> = c
        .iter()
        .filter(|e| e["unix_time"].as_f64().unwrap() < switched)
        .collect();
    let after: Vec<&Value> = c
        .iter()
        .filter(|e| e["unix_time"].as_f64().unwrap() > switched)
        .collect();
    assert!(
        before.len() >= 3 && after.len() >= 3,
        "{} before, {} after",
        before.len(),
        after.len()
    );
    // The one request in flight across the switch may carry either policy;
    // every later one carries the new one.
    assert!(
        before
            .iter()
            .all(|e| e["policy"] == "passthrough" && e["action"] == "passthrough"),
        "{before:?}"
    );
    assert!(
        after
            .iter()
            .skip(1)
            .all(|e| e["policy"] == "bounce" && e["action"] == "bounce"),
        "{after:?}"
    );
    // Every request completed: the server counted what the client sent
    // (plus the final FLUSH), none with an error.
    assert_eq!(stats["requests"]["requests"], r.requests + 1, "{stats}");
    assert_eq!(stats["requests"]["ioerr"], 0, "{stats}");
    assert!(
        events(&report).iter().all(|e| e["kind"] == "conflict"),
        "no torn write or checksum failure"
    );
    let (st, log) = srv.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
}

#[test]
fn bad_control_input_gets_errors_and_io_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, ctl_sock, report) = start(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let io = {
        let (s, st) = (srv.socket.clone(), stop.clone());
        std::thread::spawn(move || io_loop(s, st, 6))
    };
    let mut s = UnixStream::connect(&ctl_sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut ask = |bytes: &[u8]| -> Value {
        s.write_all(bytes).unwrap();
        let mut l = String::new();
        rd.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("reply {l:?}: {e}"))
    };
    let huge = [vec![b'{'; 1 << 20], b"\n".to_vec()].concat();
    for (input, class) in [
        (&b"\x00\xff garbage \x7f\n"[..], "GenericError"),
        (b"{\"execute\":\"format-disk\"}\n", "CommandNotFound"),
        (&huge[..], "GenericError"),
        (
            b"{\"execute\":\"set-policy\",\"arguments\":{\"policy\":42}}\n",
            "GenericError",
        ),
    ] {
        let v = ask(input);
        assert_eq!(v["error"]["class"], class, "{v}");
    }
    // The connection still answers, and nothing changed.
    let v = ask(b"{\"execute\":\"query-config\"}\n");
    assert_eq!(v["return"]["policy"], "passthrough");
    // `pinblk ctl` reports an error reply with exit status 1 and its reason.
    let (ok, _, err) = ctl(&ctl_sock, &["format-disk"]);
    assert!(!ok && err.contains("CommandNotFound"), "{err}");

    stop.store(true, Ordering::Release);
    let r = io.join().unwrap();
    assert!(r.failed.is_empty(), "failed requests: {:?}", r.failed);
    assert!(conflicts(&report)
        .iter()
        .all(|e| e["action"] == "passthrough"));
    let (st, log) = srv.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
}
