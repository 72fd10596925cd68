//! pinblk against qemu-storage-daemon: the same libblkio load generator
//! (`blkio` crate, driver `virtio-blk-vhost-user`) drives each backend over its
//! vhost-user socket, on the same raw image on tmpfs, in alternating runs.
//!
//! Run it with `ci/bench` (builds the release binary first), or
//! `cargo bench --bench vs_qsd -- [--duration S] [--rounds N] [--quick] ...`
//! (`--help` lists the options). Without `--bench` on the command line (that
//! is, under `cargo test --all-targets`) it exits at once.
//!
//! Per workload it prints a Markdown table of the medians over rounds of
//! IOPS, MiB/s, p50/p99 latency, backend CPU seconds per million requests and
//! the IOPS ratio against qemu-storage-daemon, and writes the same to
//! `target/bench/results.md`.

use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const KIB: usize = 1024;

// ---------------------------------------------------------------------------
// Workloads and the load generator
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    /// Short id, used by `--workloads`.
    id: &'static str,
    /// Table heading.
    title: &'static str,
    op: Op,
    random: bool,
    block: usize,
    depth: usize,
    queues: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        id: "randread-qd1",
        title: "4 KiB random read, depth 1, 1 queue",
        op: Op::Read,
        random: true,
        block: 4 * KIB,
        depth: 1,
        queues: 1,
    },
    Workload {
        id: "randread-qd32",
        title: "4 KiB random read, depth 32, 1 queue",
        op: Op::Read,
        random: true,
        block: 4 * KIB,
        depth: 32,
        queues: 1,
    },
    Workload {
        id: "randwrite-qd1",
        title: "4 KiB random write, depth 1, 1 queue",
        op: Op::Write,
        random: true,
        block: 4 * KIB,
        depth: 1,
        queues: 1,
    },
    Workload {
        id: "randwrite-qd32",
        title: "4 KiB random write, depth 32, 1 queue",
        op: Op::Write,
        random: true,
        block: 4 * KIB,
        depth: 32,
        queues: 1,
    },
    Workload {
        id: "randread-qd32-2q",
        title: "4 KiB random read, depth 32 per queue, 2 queues (one thread each)",
        op: Op::Read,
        random: true,
        block: 4 * KIB,
        depth: 32,
        queues: 2,
    },
    Workload {
        id: "seqread-128k",
        title: "128 KiB sequential read, depth 8, 1 queue",
        op: Op::Read,
        random: false,
        block: 128 * KIB,
        depth: 8,
        queues: 1,
    },
    Workload {
        id: "seqwrite-128k",
        title: "128 KiB sequential write, depth 8, 1 queue",
        op: Op::Write,
        random: false,
        block: 128 * KIB,
        depth: 8,
        queues: 1,
    },
];

/// What one queue's thread measured.
#[derive(Default)]
struct QueueResult {
    /// Completions inside the measured window.
    counted: u64,
    /// All completions (warm-up, window, drain): the CPU figure's divisor.
    total: u64,
    /// Latencies (ns) of the completions inside the window.
    lat_ns: Vec<u64>,
}

/// What one run (one backend, one workload) measured.
#[derive(Clone, Copy, Debug)]
struct Sample {
    iops: f64,
    mibs: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Completions inside the window slower than 10 ms.
    over_10ms: usize,
    /// Backend CPU seconds per million requests (None if not measurable).
    cpu_per_m: Option<f64>,
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Keeps exactly `w.depth` requests in flight on `q` for `warmup + window`,
/// then drains. Buffers: `w.depth` slots of `w.block` bytes at `buf`.
fn drive_queue(
    q: &mut Blkioq,
    qi: usize,
    w: &Workload,
    buf: usize,
    capacity: u64,
    warmup: Duration,
    window: Duration,
) -> Result<QueueResult, String> {
    let block = w.block as u64;
    let blocks = capacity / block;
    if blocks == 0 {
        return Err(format!("capacity {capacity} smaller than one block"));
    }
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((qi as u64 + 1) << 32) | 1);
    // Sequential: each queue starts in its own part of the disk.
    let mut cursor = (blocks / w.queues as u64) * qi as u64;
    let mut next_offset = || -> u64 {
        if w.random {
            (rng.next() % blocks) * block
        } else {
            let o = cursor * block;
            cursor = (cursor + 1) % blocks;
            o
        }
    };
    let mut submitted_at = vec![Instant::now(); w.depth];
    let submit = |q: &mut Blkioq, slot: usize, offset: u64| {
        let p = (buf + slot * w.block) as *mut u8;
        match w.op {
            Op::Read => q.read(offset, p, w.block, slot, ReqFlags::empty()),
            Op::Write => q.write(offset, p, w.block, slot, ReqFlags::empty()),
        }
    };

    let mut res = QueueResult {
        lat_ns: Vec::with_capacity(1 << 16),
        ..Default::default()
    };
    let start = Instant::now();
    let window_start = start + warmup;
    let deadline = window_start + window;
    for (slot, t) in submitted_at.iter_mut().enumerate() {
        *t = Instant::now();
        submit(q, slot, next_offset());
    }
    let mut in_flight = w.depth;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut stopping = false;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(10);
        let n = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| format!("do_io: {e}"))?;
        let now = Instant::now();
        if n == 0 {
            return Err(format!(
                "queue {qi}: no completion within 10 s with {in_flight} requests in flight \
                 ({} completed so far)",
                res.total
            ));
        }
        if now >= deadline {
            stopping = true;
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!(
                    "queue {qi}: request failed with {} ({})",
                    c.ret,
                    std::io::Error::from_raw_os_error(-c.ret)
                ));
            }
            let slot = c.user_data;
            res.total += 1;
            if now >= window_start && now < deadline {
                res.counted += 1;
                res.lat_ns
                    .push(now.duration_since(submitted_at[slot]).as_nanos() as u64);
            }
            if stopping {
                in_flight -= 1;
            } else {
                submitted_at[slot] = Instant::now();
                submit(q, slot, next_offset());
            }
        }
    }
    Ok(res)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64
}

/// Connects to `socket`, runs `w` for `warmup + window` and returns the
/// sample; `pid` is the backend whose CPU time is measured.
fn run_workload(
    socket: &Path,
    pid: u32,
    w: &Workload,
    warmup: Duration,
    window: Duration,
) -> Result<Sample, String> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| format!("blkio new: {e}"))?;
    b.set_str("path", socket.to_str().unwrap())
        .map_err(|e| format!("blkio path: {e}"))?;
    b.connect().map_err(|e| format!("blkio connect: {e}"))?;
    b.set_i32("num-queues", w.queues as i32)
        .map_err(|e| format!("blkio num-queues: {e}"))?;
    let out = b.start().map_err(|e| format!("blkio start: {e}"))?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| format!("capacity: {e}"))?;
    let per_queue = w.depth * w.block;
    let region = b
        .alloc_mem_region(per_queue * w.queues)
        .map_err(|e| format!("alloc_mem_region: {e}"))?;
    b.map_mem_region(&region)
        .map_err(|e| format!("map_mem_region: {e}"))?;
    // Non-zero data, so writes carry something to checksum.
    // SAFETY: the region is `region.len` bytes mapped for us by libblkio and
    // no request is in flight yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let mut x = XorShift(0x1234_5678_9abc_def1);
    for chunk in bytes.chunks_mut(8) {
        let v = x.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }

    let mut queues = out.queues;
    if queues.len() < w.queues {
        return Err(format!("got {} queues, wanted {}", queues.len(), w.queues));
    }
    let cpu0 = proc_cpu_seconds(pid);
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .take(w.queues)
            .enumerate()
            .map(|(qi, q)| {
                let buf = region.addr + qi * per_queue;
                s.spawn(move || drive_queue(q, qi, w, buf, capacity, warmup, window))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("queue thread panicked".into()))
            })
            .collect()
    });
    let cpu1 = proc_cpu_seconds(pid);
    drop(queues);
    drop(b);

    let mut counted = 0;
    let mut total = 0;
    let mut lat = Vec::new();
    for r in results {
        let r = r?;
        counted += r.counted;
        total += r.total;
        lat.extend_from_slice(&r.lat_ns);
    }
    lat.sort_unstable();
    let secs = window.as_secs_f64();
    let iops = counted as f64 / secs;
    let cpu_per_m = match (cpu0, cpu1) {
        (Some(a), Some(b)) if total > 0 => Some((b - a) / total as f64 * 1e6),
        _ => None,
    };
    Ok(Sample {
        iops,
        mibs: iops * w.block as f64 / (1024.0 * 1024.0),
        p50_us: percentile(&lat, 0.50) / 1000.0,
        p99_us: percentile(&lat, 0.99) / 1000.0,
        max_us: lat.last().map_or(f64::NAN, |&x| x as f64 / 1000.0),
        over_10ms: lat.len() - lat.partition_point(|&x| x <= 10_000_000),
        cpu_per_m,
    })
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// utime + stime of process `pid` (all its threads), in seconds.
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name "(...)": state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if tck <= 0 {
        return None;
    }
    Some((utime + stime) as f64 / tck as f64)
}

#[derive(Clone, Debug)]
struct BackendSpec {
    /// Row label.
    name: String,
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    Qsd,
    /// qemu-storage-daemon on its `null-co` driver: no storage, the request
    /// path alone (the peer of `pinblk --null`).
    QsdNull,
    Pinblk(Vec<String>),
    /// The same flags on the `--pinblk-b` binary: an A/B comparison inside
    /// the same alternating rounds.
    PinblkB(Vec<String>),
    /// pinblk serving a loop device attached over the same image (issue 15:
    /// a host block device beside the file).
    PinblkLoop(Vec<String>),
}

/// A loop device over the bench image, detached on drop (also on panic).
struct LoopDev(PathBuf);

impl LoopDev {
    /// Attaches `image`; `Err` says why not (not root, no losetup, ...).
    fn attach(image: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDev(PathBuf::from(dev)))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A running backend, killed (and its socket removed) on drop, also on panic.
struct Running {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Running {
    fn start(
        spec: &BackendSpec,
        opts: &Opts,
        image: &Path,
        loop_dev: Option<&Path>,
        dir: &Path,
        idx: usize,
    ) -> Result<Running, String> {
        let socket = dir.join(format!("backend{idx}.sock"));
        let log = dir.join(format!("backend{idx}.log"));
        let _ = std::fs::remove_file(&socket);
        let logf = std::fs::File::create(&log).map_err(|e| format!("create log: {e}"))?;
        let mut cmd = match &spec.kind {
            Kind::Qsd | Kind::QsdNull => {
                let mut c = Command::new(&opts.qsd);
                if matches!(spec.kind, Kind::QsdNull) {
                    // read-zeroes=off: like `pinblk --null`, READs leave the
                    // buffer untouched.
                    c.arg("--blockdev").arg(format!(
                        "driver=null-co,node-name=disk0,size={},read-zeroes=off",
                        opts.size
                    ));
                } else {
                    c.arg("--blockdev")
                        .arg(format!(
                            "driver=file,node-name=file0,filename={},cache.direct=off,aio=io_uring",
                            image.display()
                        ))
                        .arg("--blockdev")
                        .arg("driver=raw,node-name=disk0,file=file0");
                }
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
                         addr.path={},writable=on,num-queues={}",
                    socket.display(),
                    opts.num_queues
                ));
                c
            }
            Kind::PinblkLoop(extra) => {
                let dev = loop_dev.ok_or("no loop device attached")?;
                // A fresh store every start, as for the file (below).
                let store = dir.join("loop.pinsum");
                let _ = std::fs::remove_file(&store);
                let mut c = Command::new(&opts.pinblk);
                c.arg("serve")
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--image")
                    .arg(dev)
                    .arg("--checksum-store")
                    .arg(&store)
                    .arg("--num-queues")
                    .arg(opts.num_queues.to_string())
                    .args(extra)
                    .env("RUST_LOG", "warn");
                c
            }
            Kind::Pinblk(extra) | Kind::PinblkB(extra) => {
                let bin = match (&spec.kind, &opts.pinblk_b) {
                    (Kind::PinblkB(_), Some(b)) => b,
                    _ => &opts.pinblk,
                };
                // pinblk's checksum store (default IMAGE.pinsum) would be stale
                // after another backend wrote the image: every READ of such a
                // block would take the mismatch path. Without a store, pinblk
                // builds one from the image's content before it listens.
                let mut store = image.as_os_str().to_owned();
                store.push(".pinsum");
                let _ = std::fs::remove_file(&store);
                let mut c = Command::new(bin);
                c.arg("serve")
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--image")
                    .arg(image)
                    .arg("--num-queues")
                    .arg(opts.num_queues.to_string())
                    .args(extra)
                    .env("RUST_LOG", "warn");
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", spec.name))?;
        let mut r = Running { child, socket, log };
        let t = Instant::now();
        while !r.socket.exists() {
            if let Ok(Some(st)) = r.child.try_wait() {
                return Err(format!(
                    "{} exited ({st}) before creating its socket: {}",
                    spec.name,
                    r.log_tail()
                ));
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "{} created no socket in 120 s: {}",
                    spec.name,
                    r.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(r)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(15);
        lines[from..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 5 s; waits, so the image lock is free after.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The rows: qemu-storage-daemon, then the pinblk configurations whose flags
/// `pinblk serve --help` mentions.
fn backends(opts: &Opts, notes: &mut Vec<String>) -> Vec<BackendSpec> {
    let mut v = Vec::new();
    if Command::new(&opts.qsd).arg("--version").output().is_ok() {
        v.push(BackendSpec {
            name: "qemu-storage-daemon (aio=io_uring)".into(),
            kind: Kind::Qsd,
        });
        v.push(BackendSpec {
            name: "qemu-storage-daemon null-co (reference)".into(),
            kind: Kind::QsdNull,
        });
    } else {
        notes.push(format!("skipped: {} not found", opts.qsd));
    }
    let help = Command::new(&opts.pinblk)
        .args(["serve", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let has = |flag: &str| {
        help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
            .any(|w| w == flag)
    };
    let configs: &[(&str, &[&str], &[&str])] = &[
        (
            "pinblk checksums off + passthrough",
            &["--checksum", "--policy"],
            &["--checksum", "off", "--policy", "passthrough"],
        ),
        (
            "pinblk checksums off, pin tracking off",
            &["--checksum", "--pin-tracking"],
            &["--checksum", "off", "--pin-tracking", "off"],
        ),
        ("pinblk checksums on + bounce (default)", &[], &[]),
        (
            "pinblk --checksum off",
            &["--checksum"],
            &["--checksum", "off"],
        ),
        (
            "pinblk --aio io_uring (checksums on + bounce)",
            &["--aio"],
            &["--aio", "io_uring"],
        ),
        (
            "pinblk --checksum off --poll-max-us 0 (no polling)",
            &["--checksum", "--poll-max-us"],
            &["--checksum", "off", "--poll-max-us", "0"],
        ),
        (
            "pinblk checksums on, range tracking off",
            &["--range-tracking"],
            &["--range-tracking", "off"],
        ),
        (
            "pinblk checksums on + bounce always",
            &["--bounce"],
            &["--bounce", "always"],
        ),
        (
            "pinblk --null --checksum off (reference)",
            &["--null"],
            &["--null", "--checksum", "off"],
        ),
        (
            "pinblk --null --checksum off --poll-max-us 0 (no polling)",
            &["--null", "--poll-max-us"],
            &["--null", "--checksum", "off", "--poll-max-us", "0"],
        ),
    ];
    for (name, needs, args) in configs {
        if let Some(missing) = needs.iter().find(|f| !has(f)) {
            notes.push(format!("skipped {name}: pinblk has no {missing} yet"));
            continue;
        }
        v.push(BackendSpec {
            name: (*name).into(),
            kind: Kind::Pinblk(args.iter().map(|s| s.to_string()).collect()),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/loop-control").exists() {
        notes
            .push("skipped the loop-device row: loop devices need root and the loop driver".into());
    } else if has("--checksum-store") {
        v.push(BackendSpec {
            name: "pinblk checksums on + bounce, loop device over the image, --direct".into(),
            kind: Kind::PinblkLoop(vec!["--direct".into()]),
        });
    }
    if opts.pinblk_b.is_some() {
        let b: Vec<BackendSpec> = v
            .iter()
            .filter_map(|s| match &s.kind {
                Kind::Pinblk(args) => Some(BackendSpec {
                    name: format!("B {}", s.name),
                    kind: Kind::PinblkB(args.clone()),
                }),
                _ => None,
            })
            .collect();
        v.extend(b);
    }
    v
}

// ---------------------------------------------------------------------------
// Options, driver, report
// ---------------------------------------------------------------------------

struct Opts {
    duration: f64,
    rounds: usize,
    size: u64,
    num_queues: usize,
    workloads: Vec<Workload>,
    only_backends: Option<Vec<String>>,
    warmup_pass: bool,
    pinblk: String,
    /// A second pinblk binary (`--pinblk-b`): each pinblk row again on it.
    pinblk_b: Option<String>,
    qsd: String,
    out: PathBuf,
    dir: PathBuf,
}

const USAGE: &str = "\
vs_qsd: pinblk against qemu-storage-daemon (run via ci/bench or `cargo bench --bench vs_qsd -- ARGS`)

  --duration SECS     measured seconds per run (default 5; a warm-up of 10%, at most 0.5 s, comes first)
  --rounds N          alternating rounds; figures are medians over rounds (default 3)
  --quick             --duration 1 --rounds 1
  --size BYTES        image size (K/M/G suffixes; default 1G)
  --num-queues N      queues each backend offers (default 2)
  --workloads A,B     only these workload ids (default all)
  --backends S,T      only backends whose label contains one of these (e.g. qemu,null,always);
                      one starting with '=' must be the whole label (e.g. '=pinblk --checksum off',
                      which alone would also pick the --poll-max-us 0 row)
  --no-warmup-pass    skip the discarded 0.2 s-per-workload pass over every backend before round 1
  --pinblk PATH       pinblk binary (default $PINBLK, else target/release/pinblk)
  --pinblk-b PATH     a second pinblk binary: every pinblk row again on it (\"B ...\"), in the
                      same alternating rounds, and a \"B / A\" table (with --backends, an A/B
                      comparison of two builds that shares the machine's drift)
  --qsd PATH          qemu-storage-daemon (default $QSD, else qemu-storage-daemon)
  --out PATH          Markdown output (default target/bench/results.md)
  --dir PATH          where the image and sockets go (default /dev/shm)
";

fn parse_size(s: &str) -> Result<u64, String> {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .map(|n| n * m)
        .map_err(|e| format!("bad size {s}: {e}"))
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        duration: 5.0,
        rounds: 3,
        size: 1 << 30,
        num_queues: 2,
        workloads: WORKLOADS.to_vec(),
        only_backends: None,
        warmup_pass: true,
        pinblk: std::env::var("PINBLK").unwrap_or_else(|_| {
            root.join("target/release/pinblk")
                .to_string_lossy()
                .into_owned()
        }),
        pinblk_b: None,
        qsd: std::env::var("QSD").unwrap_or_else(|_| "qemu-storage-daemon".into()),
        out: root.join("target/bench/results.md"),
        dir: PathBuf::from("/dev/shm"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {}
            "--quick" => {
                o.duration = 1.0;
                o.rounds = 1;
            }
            "--duration" => o.duration = val()?.parse().map_err(|e| format!("--duration: {e}"))?,
            "--rounds" => o.rounds = val()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--size" => o.size = parse_size(&val()?)?,
            "--num-queues" => {
                o.num_queues = val()?.parse().map_err(|e| format!("--num-queues: {e}"))?
            }
            "--workloads" => {
                let v = val()?;
                let want: Vec<&str> = v.split(',').collect();
                for w in &want {
                    if !WORKLOADS.iter().any(|x| x.id == *w) {
                        let ids: Vec<_> = WORKLOADS.iter().map(|x| x.id).collect();
                        return Err(format!("unknown workload {w}; known: {}", ids.join(",")));
                    }
                }
                o.workloads = WORKLOADS
                    .iter()
                    .filter(|x| want.contains(&x.id))
                    .copied()
                    .collect();
            }
            "--backends" => {
                o.only_backends = Some(val()?.split(',').map(|s| s.to_lowercase()).collect())
            }
            "--no-warmup-pass" => o.warmup_pass = false,
            "--pinblk" => o.pinblk = val()?,
            "--pinblk-b" => o.pinblk_b = Some(val()?),
            "--qsd" => o.qsd = val()?,
            "--out" => o.out = PathBuf::from(val()?),
            "--dir" => o.dir = PathBuf::from(val()?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.rounds == 0 || o.duration <= 0.0 {
        return Err("--rounds and --duration must be positive".into());
    }
    if o.workloads.iter().any(|w| w.queues > o.num_queues) {
        return Err("a workload uses more queues than --num-queues".into());
    }
    Ok(o)
}

/// A raw image of `size` bytes, written once with non-zero data. On tmpfs,
/// fallocate alone is not enough: fallocated pages are not "uptodate", so a
/// read returns zeroes without touching memory, and the first write to each
/// page allocates it; writing the whole image makes reads and writes real.
fn make_image(path: &Path, size: u64) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x = XorShift(0xdead_beef_cafe_f00d);
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&x.next().to_le_bytes()[..chunk.len()]);
    }
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| format!("sync image: {e}"))?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[derive(Clone, Copy, Default)]
struct Med {
    iops: Option<f64>,
    mibs: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    cpu: Option<f64>,
    n: usize,
}

fn medians(samples: &[Sample]) -> Med {
    Med {
        iops: median(samples.iter().map(|s| s.iops).collect()),
        mibs: median(samples.iter().map(|s| s.mibs).collect()),
        p50: median(samples.iter().map(|s| s.p50_us).collect()),
        p99: median(samples.iter().map(|s| s.p99_us).collect()),
        cpu: median(samples.iter().filter_map(|s| s.cpu_per_m).collect()),
        n: samples.len(),
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kb| format!(", {} GiB RAM", (kb + (1 << 19)) >> 20))
        .unwrap_or_default();
    format!("{nproc} CPUs, {cpu}{mem}, Linux {kernel}")
}

/// UTC date and time to the minute, "YYYY-MM-DD HH:MM UTC".
fn now_utc() -> String {
    let (t, _) = pinblk::report::now();
    format!("{} {} UTC", &t[..10], &t[11..16])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it: do nothing then, so the test suite stays fast.
    if !args
        .iter()
        .any(|a| a == "--bench" || a == "--help" || a == "-h")
    {
        println!("vs_qsd: not run (cargo bench passes --bench; use ci/bench)");
        return;
    }
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}\n");
            }
            eprint!("{USAGE}");
            std::process::exit(if e.is_empty() { 0 } else { 2 });
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("vs_qsd: {e}");
        std::process::exit(1);
    }
}

fn run(opts: &Opts) -> Result<(), String> {
    if opts.pinblk.contains('/') && !Path::new(&opts.pinblk).exists() {
        return Err(format!(
            "no pinblk binary at {} (build it: cargo build --release --bin pinblk, or set PINBLK)",
            opts.pinblk
        ));
    }
    let mut notes = Vec::new();
    let mut specs = backends(opts, &mut notes);
    if let Some(only) = &opts.only_backends {
        specs.retain(|s| {
            let n = s.name.to_lowercase();
            // A "B ..." row (--pinblk-b) goes with its A row.
            let a = n
                .strip_prefix("b ")
                .filter(|_| matches!(s.kind, Kind::PinblkB(_)));
            only.iter().any(|o| match o.strip_prefix('=') {
                Some(whole) => n == whole || a == Some(whole),
                None => n.contains(o.as_str()),
            })
        });
    }
    for n in &notes {
        println!("{n}");
    }
    if specs.is_empty() {
        return Err("no backend to measure".into());
    }

    let dir = tempfile::Builder::new()
        .prefix("pinblk-bench.")
        .tempdir_in(&opts.dir)
        .map_err(|e| format!("temp dir in {}: {e}", opts.dir.display()))?;
    let image = dir.path().join("disk.img");
    make_image(&image, opts.size)?;
    let loop_dev = if specs.iter().any(|s| matches!(s.kind, Kind::PinblkLoop(_))) {
        match LoopDev::attach(&image) {
            Ok(l) => Some(l),
            Err(e) => {
                println!("loop-device row skipped: {e}");
                specs.retain(|s| !matches!(s.kind, Kind::PinblkLoop(_)));
                None
            }
        }
    } else {
        None
    };
    let loop_path = loop_dev.as_ref().map(|l| l.0.as_path());

    let window = Duration::from_secs_f64(opts.duration);
    let warmup = Duration::from_secs_f64((opts.duration * 0.1).min(0.5));
    // samples[backend][workload]
    let mut samples: Vec<Vec<Vec<Sample>>> =
        vec![vec![Vec::new(); opts.workloads.len()]; specs.len()];
    let mut errors: Vec<String> = Vec::new();
    let t_all = Instant::now();
    // Round 0 is a short warm-up pass (discarded): on this VM the first
    // processes to touch fresh memory run measurably slower.
    let first = if opts.warmup_pass { 0 } else { 1 };
    for round in first..=opts.rounds {
        let (warmup, window) = if round == 0 {
            (Duration::from_millis(50), Duration::from_millis(200))
        } else {
            (warmup, window)
        };
        for (bi, spec) in specs.iter().enumerate() {
            if round == 0 {
                println!("warm-up pass (discarded): {}", spec.name);
            } else {
                println!("round {round}/{}: {}", opts.rounds, spec.name);
            }
            let mut be = match Running::start(spec, opts, &image, loop_path, dir.path(), bi) {
                Ok(b) => b,
                Err(e) => {
                    println!("  failed to start: {e}");
                    errors.push(format!("round {round}: {}: {e}", spec.name));
                    continue;
                }
            };
            for (wi, w) in opts.workloads.iter().enumerate() {
                if !be.alive() {
                    let msg = format!("{} died: {}", spec.name, be.log_tail());
                    println!("  {}: skipped, {msg}", w.id);
                    errors.push(format!("round {round}: {}: {msg}", w.id));
                    break;
                }
                match run_workload(&be.socket, be.pid(), w, warmup, window) {
                    Ok(s) => {
                        println!(
                            "  {:<18} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} µs  p99 {:>8.1} µs  \
                             max {:>8.1} µs ({} > 10 ms)  CPU {} s/1M",
                            w.id,
                            s.iops,
                            s.mibs,
                            s.p50_us,
                            s.p99_us,
                            s.max_us,
                            s.over_10ms,
                            fmt_opt(s.cpu_per_m, 2)
                        );
                        if round > 0 {
                            samples[bi][wi].push(s);
                        }
                    }
                    Err(e) => {
                        let alive = be.alive();
                        let msg = format!(
                            "{e} (backend {}){}",
                            if alive { "still running" } else { "exited" },
                            {
                                let t = be.log_tail();
                                if t.is_empty() {
                                    String::new()
                                } else {
                                    format!("; its log:\n{t}")
                                }
                            }
                        );
                        println!("  {}: FAILED: {msg}", w.id);
                        errors.push(format!("round {round}: {}: {}: {msg}", spec.name, w.id));
                        if alive {
                            // A stalled connection may leave the backend in a bad
                            // state: restart it for the next workload.
                            be.stop();
                            match Running::start(spec, opts, &image, loop_path, dir.path(), bi) {
                                Ok(b) => be = b,
                                Err(e) => {
                                    errors.push(format!("restart {}: {e}", spec.name));
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            let tail = be.log_tail();
            be.stop();
            if !tail.trim().is_empty() {
                println!("  {} log (tail):\n{}", spec.name, indent(&tail));
            }
        }
    }

    let report = report(opts, &specs, &samples, &notes, &errors, t_all.elapsed());
    println!("\n{report}");
    if let Some(parent) = opts.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&opts.out, &report).map_err(|e| format!("write {}: {e}", opts.out.display()))?;
    println!("written to {}", opts.out.display());
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn report(
    opts: &Opts,
    specs: &[BackendSpec],
    samples: &[Vec<Vec<Sample>>],
    notes: &[String],
    errors: &[String],
    took: Duration,
) -> String {
    let mut r = String::new();
    let cmd = std::env::var("PINBLK_BENCH_CMD").unwrap_or_else(|_| {
        let a: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        format!("cargo bench --bench vs_qsd -- {}", a.join(" "))
    });
    let rev = sh(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    let qsd_ver = sh(&opts.qsd, &["--version"])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let _ = writeln!(r, "## pinblk vs qemu-storage-daemon\n");
    let _ = writeln!(r, "- machine: {}", machine());
    let _ = writeln!(r, "- date: {}", now_utc());
    let _ = writeln!(r, "- command: `{}`", cmd.trim());
    let _ = writeln!(
        r,
        "- pinblk {} ({}), {}",
        if rev.is_empty() { "?" } else { &rev },
        opts.pinblk,
        if qsd_ver.is_empty() {
            "qemu-storage-daemon ?".into()
        } else {
            qsd_ver
        }
    );
    let _ = writeln!(
        r,
        "- {} s measured per run (after {:.1} s warm-up), {} alternating round(s), medians; \
         {} MiB raw image on {} (written once before the first run), every backend offers {} queues; \
         load generator: libblkio virtio-blk-vhost-user, one thread per queue, \
         latency = submit to completion seen by the client",
        opts.duration,
        (opts.duration * 0.1).min(0.5),
        opts.rounds,
        opts.size >> 20,
        opts.dir.display(),
        opts.num_queues
    );
    let _ = writeln!(
        r,
        "- qemu-storage-daemon: `--blockdev driver=file,...,cache.direct=off,aio=io_uring \
         --blockdev driver=raw,... --export type=vhost-user-blk,...,writable=on,num-queues={}`",
        opts.num_queues
    );
    let _ = writeln!(
        r,
        "- CPU s / 1M req: backend utime+stime (/proc/PID/stat, all threads) over the run \
         (warm-up, window, drain) per million requests completed in it; ratio = IOPS / qemu-storage-daemon's IOPS"
    );
    for n in notes {
        let _ = writeln!(r, "- {n}");
    }
    let _ = writeln!(r);

    let meds: Vec<Vec<Med>> = samples
        .iter()
        .map(|per_w| per_w.iter().map(|s| medians(s)).collect())
        .collect();
    let qsd_idx = specs.iter().position(|s| matches!(s.kind, Kind::Qsd));
    let qsd_null_idx = specs.iter().position(|s| matches!(s.kind, Kind::QsdNull));
    for (wi, w) in opts.workloads.iter().enumerate() {
        let _ = writeln!(r, "### {} (`{}`)\n", w.title, w.id);
        let _ = writeln!(
            r,
            "| backend | IOPS | MiB/s | p50 µs | p99 µs | CPU s / 1M req | ratio vs qsd |"
        );
        let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|---:|");
        let base = qsd_idx.and_then(|q| meds[q][wi].iops);
        let null_base = qsd_null_idx.and_then(|q| meds[q][wi].iops);
        for (bi, spec) in specs.iter().enumerate() {
            let m = meds[bi][wi];
            // The no-storage rows are compared with each other.
            let (base, of) = if spec.name.contains("--null") || Some(bi) == qsd_null_idx {
                (null_base, " of null-co")
            } else {
                (base, "")
            };
            let ratio = match (m.iops, base) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×{of}", a / b),
                _ => "–".into(),
            };
            let name = if m.n < opts.rounds {
                format!("{} ({} of {} runs)", spec.name, m.n, opts.rounds)
            } else {
                spec.name.clone()
            };
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {} |",
                name,
                fmt_opt(m.iops, 0),
                fmt_opt(m.mibs, 1),
                fmt_opt(m.p50, 1),
                fmt_opt(m.p99, 1),
                fmt_opt(m.cpu, 2),
                ratio
            );
        }
        let _ = writeln!(r);
    }

    if let Some(b) = &opts.pinblk_b {
        let _ = writeln!(r, "### B / A: `{b}` against `{}`\n", opts.pinblk);
        let _ = writeln!(r, "| backend | workload | A IOPS | B IOPS | B / A |");
        let _ = writeln!(r, "|---|---|---:|---:|---:|");
        for (bi, spec) in specs.iter().enumerate() {
            let Some(a_name) = spec.name.strip_prefix("B ") else {
                continue;
            };
            let Some(ai) = specs.iter().position(|s| s.name == a_name) else {
                continue;
            };
            for (wi, w) in opts.workloads.iter().enumerate() {
                if let (Some(a), Some(b)) = (meds[ai][wi].iops, meds[bi][wi].iops) {
                    let _ = writeln!(
                        r,
                        "| {a_name} | {} | {a:.0} | {b:.0} | {:.3} |",
                        w.id,
                        b / a
                    );
                }
            }
        }
        let _ = writeln!(r);
    }

    let _ = writeln!(r, "### Targets (issue 17)\n");
    let find = |needle: &str| specs.iter().position(|s| s.name.contains(needle));
    let iops = |b: Option<usize>, id: &str| -> Option<f64> {
        let wi = opts.workloads.iter().position(|w| w.id == id)?;
        meds[b?][wi].iops
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let check =
        |r: &mut String, what: &str, v: Option<f64>, goal: &str, ok: &dyn Fn(f64) -> bool| {
            let (val, verdict) = match v {
                Some(x) => (format!("{x:.2}"), if ok(x) { "met" } else { "**missed**" }),
                None => ("–".into(), "not measured"),
            };
            let _ = writeln!(r, "| {what} | {val} | {goal} | {verdict} |");
        };
    let _ = writeln!(r, "| target | measured | goal | |");
    let _ = writeln!(r, "|---|---:|---|---|");
    let (def, off17) = (find("(default)"), find("pinblk --checksum off"));
    let (null17, qnull) = (find("pinblk --null"), qsd_null_idx);
    for id in [
        "seqread-128k",
        "seqwrite-128k",
        "randread-qd32",
        "randwrite-qd32",
    ] {
        check(
            &mut r,
            &format!("{id}: default / qsd"),
            ratio(iops(def, id), iops(qsd_idx, id)),
            "≥ 1.20",
            &|x| x >= 1.2,
        );
    }
    for id in ["randread-qd32", "randwrite-qd32"] {
        check(
            &mut r,
            &format!("{id}: checksums on (default) / `--checksum off`"),
            ratio(iops(def, id), iops(off17, id)),
            "≥ 0.85",
            &|x| x >= 0.85,
        );
    }
    for id in ["randread-qd32", "seqread-128k"] {
        check(
            &mut r,
            &format!("{id}: `--null --checksum off` / qsd null-co"),
            ratio(iops(null17, id), iops(qnull, id)),
            "≥ 1.20",
            &|x| x >= 1.2,
        );
    }
    let (crc4, mem4, crc128, mem128) = crc_vs_memcpy();
    check(
        &mut r,
        "CRC32C / memcpy time per byte, 4 KiB (hot buffer)",
        Some(mem4 / crc4),
        "≤ 2.00",
        &|x| x <= 2.0,
    );
    let _ = writeln!(
        r,
        "\nCRC GB/s per core vs memcpy GB/s on this CPU (pinblk's CRC32C, hot buffer, best of 5 \
         batches; `cargo bench --bench crc` has criterion's figures): 4 KiB {crc4:.1} vs \
         {mem4:.1}, 128 KiB {crc128:.1} vs {mem128:.1}.\n"
    );

    let _ = writeln!(r, "### Targets (issue 6)\n");
    let find = |needle: &str| specs.iter().position(|s| s.name.contains(needle));
    let iops = |b: Option<usize>, id: &str| -> Option<f64> {
        let wi = opts.workloads.iter().position(|w| w.id == id)?;
        meds[b?][wi].iops
    };
    let qsd = qsd_idx;
    let def = find("(default)");
    let off = find("checksums off + passthrough");
    let nopins = find("pin tracking off");
    let always = find("bounce always");
    let null = find("--null");
    let check =
        |r: &mut String, what: &str, v: Option<f64>, goal: &str, ok: &dyn Fn(f64) -> bool| {
            let (val, verdict) = match v {
                Some(x) => (format!("{x:.2}"), if ok(x) { "met" } else { "**missed**" }),
                None => ("–".into(), "not measured"),
            };
            let _ = writeln!(r, "| {what} | {val} | {goal} | {verdict} |");
        };
    let _ = writeln!(r, "| target | measured | goal | |");
    let _ = writeln!(r, "|---|---:|---|---|");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for id in ["randread-qd32", "randwrite-qd32"] {
        check(
            &mut r,
            &format!("{id}: default / qsd IOPS"),
            ratio(iops(def, id), iops(qsd, id)),
            "≥ 1.30",
            &|x| x >= 1.3,
        );
    }
    for id in ["randread-qd32", "randwrite-qd32"] {
        check(
            &mut r,
            &format!("{id}: checksums on (default) / off IOPS"),
            ratio(iops(def, id), iops(off, id)),
            "≥ 0.90",
            &|x| x >= 0.9,
        );
    }
    for id in ["seqread-128k", "seqwrite-128k"] {
        check(
            &mut r,
            &format!("{id}: default / qsd MiB/s"),
            ratio(iops(def, id), iops(qsd, id)),
            "≥ 1.00",
            &|x| x >= 1.0,
        );
        check(
            &mut r,
            &format!("{id}: bounce always / passthrough MiB/s"),
            ratio(iops(always, id), iops(off, id)),
            "≥ 0.75",
            &|x| x >= 0.75,
        );
    }
    for id in ["randread-qd32", "randwrite-qd32", "randread-qd32-2q"] {
        check(
            &mut r,
            &format!("{id}: default / --null IOPS"),
            ratio(iops(def, id), iops(null, id)),
            "≥ 0.70",
            &|x| x >= 0.7,
        );
    }
    for id in ["randread-qd32", "randwrite-qd32"] {
        check(
            &mut r,
            &format!("{id}: pin tracking on / off IOPS (checksums off, no conflicts)"),
            ratio(iops(off, id), iops(nopins, id)),
            "≥ 0.97",
            &|x| x >= 0.97,
        );
    }
    let noranges = find("range tracking off");
    let _ = writeln!(
        r,
        "\n### Cost of LBA range locks and the write-intent record (issue 11)\n"
    );
    let _ = writeln!(
        r,
        "Default (checksums on, range tracking on) against the same with `--range-tracking off`."
    );
    let _ = writeln!(r, "\n| workload | on / off IOPS |\n|---|---:|");
    for id in ["randwrite-qd32", "seqwrite-128k", "randread-qd32-2q"] {
        let v =
            ratio(iops(def, id), iops(noranges, id)).map_or("–".into(), |x| format!("{x:.2}"));
        let _ = writeln!(r, "| {id} | {v} |");
    }
    if !errors.is_empty() {
        let _ = writeln!(r, "\n### Errors\n");
        for e in errors {
            let _ = writeln!(r, "- {}", e.replace('\n', "\n  "));
        }
    }
    let _ = writeln!(r, "\n_Took {:.0} s._", took.as_secs_f64());
    r
}

/// GB/s of pinblk's CRC32C and of memcpy on one core, hot buffers, at 4 KiB
/// and 128 KiB: (crc 4K, memcpy 4K, crc 128K, memcpy 128K). Best of 5
/// batches of about 50 ms each.
fn crc_vs_memcpy() -> (f64, f64, f64, f64) {
    fn best(len: usize, mut f: impl FnMut()) -> f64 {
        let iters = (64 << 20) / len;
        (0..6)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                (iters * len) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .skip(1)
            .fold(0.0, f64::max)
    }
    let mut out = [0.0; 4];
    for (i, len) in [4 * KIB, 128 * KIB].into_iter().enumerate() {
        let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; len];
        out[2 * i] = best(len, || {
            std::hint::black_box(pinblk::integrity::crc32c(std::hint::black_box(&src)));
        });
        out[2 * i + 1] = best(len, || {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
        });
    }
    (out[0], out[1], out[2], out[3])
}
