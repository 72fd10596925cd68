//! The control socket (`pinblk serve --control PATH`) and its client
//! (`pinblk ctl`): JSON lines in the manner of QEMU's QMP.
//!
//! A client sends one JSON object per line, `{"execute": COMMAND,
//! "arguments": {...}}` (`arguments` optional; an `id` is echoed back), and
//! gets one line back: `{"return": VALUE}` or `{"error": {"class": CLASS,
//! "desc": TEXT}}`, `CLASS` being `CommandNotFound` or `GenericError` (QMP's
//! names). There is no greeting and no capabilities negotiation.
//!
//! | command | arguments | returns |
//! |---|---|---|
//! | `query-stats` | | request, pin, range-lock and event counters |
//! | `query-pins` | | pin counters (pages pinned now, in flight, long-term, acquired/released) |
//! | `query-config` | | the device and its current settings |
//! | `set-policy` | `policy`: `passthrough`\|`bounce`\|`stall`\|`fail`; optional `bounce`: `conflicts`\|`always` | the new settings |
//! | `set-on-mismatch` | `on-mismatch`: `report`\|`eio` | the new settings |
//! | `set-injection` | `read-delay-ms` (0: off), optional `probability` (0..1, default 1) | the new settings |
//! | `flush-report` | | the report file (flushed and fdatasynced) and the event counters |
//! | `query-commands` | | the command names |
//!
//! Settings apply to requests admitted after the reply (each request keeps
//! the decision it was admitted with). The server is one thread accepting
//! at most [`MAX_CLIENTS`] connections at once, a thread each; a line is at
//! most [`MAX_LINE`] bytes. A bad line gets an error reply and changes
//! nothing: the data path never waits for the control socket (it reads a
//! few atomics, docs/DESIGN.md §4).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::device::Device;
use crate::integrity::OnMismatch;
use crate::pin::policy::Policy;

#[cfg(test)]
mod tests;

/// Longest request line accepted, bytes (without its newline). A longer one
/// gets an error reply and is skipped up to its newline.
pub const MAX_LINE: usize = 64 * 1024;
/// Most connections served at once; one more gets an error reply and is closed.
pub const MAX_CLIENTS: usize = 8;
/// How often idle server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// The commands [`execute`] knows.
pub const COMMANDS: [&str; 8] = [
    "query-stats",
    "query-pins",
    "query-config",
    "set-policy",
    "set-on-mismatch",
    "set-injection",
    "flush-report",
    "query-commands",
];

/// Errors of the control socket and its client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control socket cannot be created.
    #[error("control socket {path}: {source}; check that its directory exists and is writable, or choose another --control path")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The client cannot reach the server or lost it.
    #[error("control socket {path}: {source}; is `pinblk serve --control {path}` running?")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The client's arguments are not `KEY=VALUE` or one JSON object.
    #[error("bad argument {0:?}: give KEY=VALUE pairs (VALUE is JSON or a plain word) or one JSON object")]
    BadArgument(String),
    /// The server's reply is not a JSON object.
    #[error("the server's reply is not JSON: {0:?}")]
    BadReply(String),
}

/// An error reply: `{"error": {"class": CLASS, "desc": DESC}}`.
fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({ "error": { "class": class, "desc": desc.into() } })
}

fn generic(desc: impl Into<String>) -> Value {
    error("GenericError", desc)
}

/// Answers one request line (without its newline) for `dev`: always a JSON
/// object, `{"return": ...}` or `{"error": ...}`.
pub fn execute(dev: &Device, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return generic(format!(
                "not a JSON object ({e}); send one object per line, e.g. {{\"execute\":\"query-stats\"}}"
            ))
        }
    };
    let Some(obj) = req.as_object() else {
        return generic(
            "not a JSON object; send one object per line, e.g. {\"execute\":\"query-stats\"}",
        );
    };
    let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
        return generic(
            "no \"execute\" string: send {\"execute\":\"COMMAND\",\"arguments\":{...}}",
        );
    };
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return generic("\"arguments\" must be an object"),
    };
    let mut reply = match run(dev, cmd, args) {
        Ok(v) => json!({ "return": v }),
        Err(e) => e,
    };
    if let Some(id) = obj.get("id") {
        reply["id"] = id.clone();
    }
    reply
}

fn run(dev: &Device, cmd: &str, args: &Map<String, Value>) -> Result<Value, Value> {
    let known = |allowed: &[&str]| -> Result<(), Value> {
        match args.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(generic(format!(
                "{cmd}: unknown argument {k:?} (it takes: {})",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            ))),
            None => Ok(()),
        }
    };
    match cmd {
        "query-stats" => {
            known(&[])?;
            Ok(json!({
                "requests": dev.counters(),
                "pins": dev.pins().counters(),
                "events": dev.report().counters(),
                "queues": dev.queue_gauges(),
            }))
        }
        "query-pins" => {
            known(&[])?;
            Ok(json!({
                "counters": dev.pins().counters(),
                "num_queues": dev.config().num_queues,
                "queue_slots": dev.pins().num_queues(),
                "longterm_after_ms": dev.pins().longterm_after().as_millis() as u64,
                "pin_tracking": dev.pin_tracking(),
            }))
        }
        "query-config" => {
            known(&[])?;
            Ok(config(dev))
        }
        "set-policy" => {
            known(&["policy", "bounce"])?;
            let policy = match args.get("policy").and_then(Value::as_str) {
                Some("passthrough") => Policy::Passthrough,
                Some("bounce") => Policy::Bounce,
                Some("stall") => Policy::Stall,
                Some("fail") => Policy::Fail,
                _ => {
                    return Err(generic(
                        "set-policy: \"policy\" must be \"passthrough\", \"bounce\", \"stall\" or \"fail\"",
                    ))
                }
            };
            let bounce = match args.get("bounce") {
                None => None,
                Some(v) => match v.as_str() {
                    Some("conflicts") => Some(false),
                    Some("always") => Some(true),
                    _ => {
                        return Err(generic(
                            "set-policy: \"bounce\" must be \"conflicts\" or \"always\"",
                        ))
                    }
                },
            };
            dev.runtime().set_policy(policy, bounce);
            log::info!(
                "control: policy set to {}, bounce {:?}",
                policy.name(),
                dev.policy().bounce_mode()
            );
            Ok(config(dev))
        }
        "set-on-mismatch" => {
            known(&["on-mismatch"])?;
            let m = match args.get("on-mismatch").and_then(Value::as_str) {
                Some("report") => OnMismatch::Report,
                Some("eio") => OnMismatch::Eio,
                _ => {
                    return Err(generic(
                        "set-on-mismatch: \"on-mismatch\" must be \"report\" or \"eio\"",
                    ))
                }
            };
            dev.runtime().set_on_mismatch(m);
            log::info!("control: on-mismatch set to {m:?}");
            Ok(config(dev))
        }
        "set-injection" => {
            known(&["read-delay-ms", "probability"])?;
            let Some(ms) = args.get("read-delay-ms").and_then(Value::as_f64) else {
                return Err(generic(
                    "set-injection: \"read-delay-ms\" must be a number of milliseconds (0 turns injection off)",
                ));
            };
            if !(0.0..=60_000.0).contains(&ms) {
                return Err(generic(
                    "set-injection: \"read-delay-ms\" must be 0 to 60000",
                ));
            }
            let p = match args.get("probability") {
                None => 1.0,
                Some(v) => match v.as_f64() {
                    Some(p) if (0.0..=1.0).contains(&p) => p,
                    _ => {
                        return Err(generic(
                            "set-injection: \"probability\" must be a number from 0 to 1",
                        ))
                    }
                },
            };
            let delay = (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
            dev.runtime().set_read_delay(delay, p);
            log::info!("control: read delay injection {delay:?} with probability {p}");
            Ok(config(dev))
        }
        "flush-report" => {
            known(&[])?;
            dev.report()
                .sync()
                .map_err(|e| generic(format!("flush-report: {e}")))?;
            Ok(json!({
                "path": dev.report().path().map(|p| p.display().to_string()),
                "events": dev.report().counters(),
            }))
        }
        "query-commands" => {
            known(&[])?;
            Ok(json!(COMMANDS))
        }
        _ => Err(error(
            "CommandNotFound",
            format!(
                "unknown command {cmd:?}; the commands are: {}",
                COMMANDS.join(", ")
            ),
        )),
    }
}

/// `query-config`: the device and its current settings.
fn config(dev: &Device) -> Value {
    let p = dev.policy();
    let c = dev.config();
    json!({
        "policy": p.policy.name(),
        "bounce": if p.bounce_always { "always" } else { "conflicts" },
        "stall_timeout_ms": p.stall_timeout.as_secs_f64() * 1000.0,
        "on_mismatch": match dev.on_mismatch() { OnMismatch::Report => "report", OnMismatch::Eio => "eio" },
        "read_delay_ms": p.read_delay.map(|d| d.as_secs_f64() * 1000.0),
        "read_delay_probability": p.read_delay_probability,
        "bounce_pool_bytes": p.bounce_pool_bytes,
        "bounce_queue_bytes": p.bounce_queue_bytes,
        "pin_tracking": dev.pin_tracking(),
        "checksums": dev.store().is_some(),
        "range_tracking": dev.ranges().is_some(),
        "image": dev.image().path().display().to_string(),
        // The engine `--aio` chose at start (a queue whose mapping raised
        // SIGBUS went on with io_uring: the log says so).
        "aio": if dev.null() { "null" } else { dev.image().aio().aio.name() },
        "capacity_sectors": c.capacity_sectors,
        "logical_block_size": c.logical_block_size,
        "num_queues": c.num_queues,
        "read_only": c.read_only,
        "serial": c.serial,
        "report": dev.report().path().map(|p| p.display().to_string()),
    })
}

/// A running control socket; [`ControlServer::stop`] (or drop) ends its
/// threads, releases the device and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600; an old socket file there is
    /// replaced) and serves it on a thread of its own.
    ///
    /// # Errors
    /// [`ControlError::Listen`] if the socket cannot be created.
    pub fn start(dev: Arc<Device>, path: &Path) -> Result<ControlServer, ControlError> {
        let err = |source| ControlError::Listen {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_file_name(format!(
            ".{}.{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        // SAFETY: umask(2) only changes the process file-mode mask; the
        // socket is made before the vhost-user server starts its threads.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&tmp);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pinblk-control".into())
            .spawn(move || accept_loop(&dev, &listener, &s))
            .map_err(err)?;
        log::info!("control socket on {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving: ends the threads (within about 50 ms, replies in
    /// progress finished), drops their hold on the device, removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(dev: &Arc<Device>, listener: &UnixListener, stop: &Arc<AtomicBool>) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        clients.retain(|c| !c.is_finished());
        match listener.accept() {
            Ok((mut stream, _)) => {
                if clients.len() >= MAX_CLIENTS {
                    let _ = writeln!(
                        stream,
                        "{}",
                        generic(format!("too many control connections (at most {MAX_CLIENTS}); close one and retry"))
                    );
                    continue;
                }
                let dev = dev.clone();
                let stop = stop.clone();
                match std::thread::Builder::new()
                    .name("pinblk-control-client".into())
                    .spawn(move || serve_client(&dev, stream, &stop))
                {
                    Ok(t) => clients.push(t),
                    Err(e) => log::warn!("control: cannot start a client thread: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(POLL);
            }
            Err(e) => {
                log::warn!("control: accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
    for c in clients {
        let _ = c.join();
    }
}

/// Serves one connection: request lines in, one reply line each.
fn serve_client(dev: &Device, stream: UnixStream, stop: &AtomicBool) {
    if stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let buf = match reader.fill_buf() {
            Ok([]) => return, // closed
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                continue
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i)),
            None => (buf, None),
        };
        if !skipping {
            if line.len() + chunk.len() > MAX_LINE {
                skipping = true;
                line.clear();
                let reply = generic(format!(
                    "request line longer than {MAX_LINE} bytes: skipped up to its newline; send one short JSON object per line"
                ));
                if writeln!(out, "{reply}").is_err() {
                    return;
                }
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(chunk.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            if !skipping {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if !text.is_empty() {
                    let reply = execute(dev, text);
                    if writeln!(out, "{reply}").is_err() {
                        return;
                    }
                }
            }
            skipping = false;
            line.clear();
        }
    }
}

/// The request `pinblk ctl` sends: `command` with `args`, each `KEY=VALUE`
/// (VALUE parsed as JSON if it is, else taken as a string), or a single
/// JSON object.
///
/// # Errors
/// [`ControlError::BadArgument`] for an argument that is neither.
pub fn request_line(command: &str, args: &[String]) -> Result<String, ControlError> {
    let arguments = match args {
        [one] if one.trim_start().starts_with('{') => match serde_json::from_str::<Value>(one) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err(ControlError::BadArgument(one.clone())),
        },
        _ => {
            let mut m = Map::new();
            for a in args {
                let Some((k, v)) = a.split_once('=') else {
                    return Err(ControlError::BadArgument(a.clone()));
                };
                let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
                m.insert(k.to_string(), v);
            }
            Value::Object(m)
        }
    };
    let mut req = json!({ "execute": command });
    if arguments.as_object().is_some_and(|m| !m.is_empty()) {
        req["arguments"] = arguments;
    }
    Ok(req.to_string())
}

/// Sends one request line to the control socket at `path` and returns the
/// reply (an object with `return` or `error`).
///
/// # Errors
/// [`ControlError::Connect`] if the socket cannot be reached or closes
/// without a reply; [`ControlError::BadReply`] if the reply is not JSON.
pub fn send(path: &Path, line: &str) -> Result<Value, ControlError> {
    let err = |source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    s.write_all(line.as_bytes()).map_err(err)?;
    s.write_all(b"\n").map_err(err)?;
    let mut reply = String::new();
    BufReader::new(s.take(4 * MAX_LINE as u64))
        .read_line(&mut reply)
        .map_err(err)?;
    if reply.is_empty() {
        return Err(err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "closed without a reply",
        )));
    }
    serde_json::from_str(reply.trim()).map_err(|_| ControlError::BadReply(reply))
}
