//! Shared helpers of the integration tests: start the real `pinblk` binary and
//! talk to it with libblkio (`blkio` crate, driver `virtio-blk-vhost-user`).
#![allow(dead_code)]

pub mod blk;
pub mod frontend;
pub mod guest_mem;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A running `pinblk serve` with its temp dir, killed on drop.
pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts `pinblk serve` on a fresh sparse image of `size` bytes with `extra` arguments.
    pub fn start(size: u64, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let size = size.to_string();
        Self::start_in(dir, image, &["--size", &size], extra)
    }

    /// Starts `pinblk serve` on `image` inside `dir`.
    pub fn start_in(
        dir: tempfile::TempDir,
        image: PathBuf,
        args: &[&str],
        extra: &[&str],
    ) -> Server {
        let socket = dir.path().join("pinblk.sock");
        let log = dir.path().join("pinblk.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pinblk"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(&image)
            .args(args)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start pinblk");
        let s = Server {
            child,
            dir,
            socket,
            image,
            log,
        };
        s.wait_for_socket();
        s
    }

    fn wait_for_socket(&self) {
        let t = Instant::now();
        while !self.socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "pinblk did not create its socket: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What pinblk logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times pinblk logged a line containing `needle`, counting
    /// the lines its rate limiter held back: a line "N more like this
    /// suppressed in the last ...: TEXT" whose TEXT contains `needle` adds N.
    pub fn logged(&self, needle: &str) -> u64 {
        count_logged(&self.log_text(), needle)
    }

    /// Sends `sig` and waits for exit, returning the exit status and the log.
    pub fn stop(mut self, sig: i32) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, self.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "pinblk did not stop: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Server {
    /// Starts `pinblk serve` on `dir/disk.img` (created sparse with `size`
    /// bytes if missing, reused with its checksum store otherwise), appending
    /// its events to `report`.
    pub fn start_reporting(
        dir: tempfile::TempDir,
        size: u64,
        report: &Path,
        extra: &[&str],
    ) -> Server {
        let image = dir.path().join("disk.img");
        let size = size.to_string();
        let create: &[&str] = if image.exists() {
            &[]
        } else {
            &["--size", &size]
        };
        let mut args = vec!["--report", report.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start_in(dir, image, create, &args)
    }

    /// `kill -9`: no drain, no clean close of the checksum store. Returns the
    /// directory (image, store, reports) for a restart; the stale socket is
    /// removed.
    pub fn kill9(mut self) -> tempfile::TempDir {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
        let _ = std::fs::remove_file(&self.socket);
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// [`Server::stop`], keeping the directory (image, store, reports).
    pub fn stop_keeping_dir(
        mut self,
        sig: i32,
    ) -> (std::process::ExitStatus, String, tempfile::TempDir) {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let (st, log) = self.stop(sig);
        (st, log, dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio client connected over the vhost-user socket, with one shared
/// memory region of `buf_len` bytes used as the I/O buffer.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub blkio: Blkio,
}

impl Client {
    /// Writes a 4 KiB pattern (seed `i + 1` for the i-th offset) at each
    /// byte offset of `offsets` on queue 0, FLUSHes, reads it back and
    /// compares. Uses the first 8 KiB of the buffer.
    pub fn write_flush_read_back(&mut self, offsets: &[u64]) {
        for (i, &off) in offsets.iter().enumerate() {
            let data = pattern(i as u64 + 1, 4096);
            self.buf()[..4096].copy_from_slice(&data);
            assert_eq!(self.write(0, off, 0, 4096), 0, "write at {off}");
            assert_eq!(self.flush(0), 0, "flush after {off}");
            self.buf()[4096..8192].fill(0);
            assert_eq!(self.read(0, off, 4096, 4096), 0, "read at {off}");
            assert_eq!(&self.buf()[4096..8192], &data[..], "read-back at {off}");
        }
    }

    /// Connects to `socket` with `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: i32, buf_len: usize) -> Result<Client, blkio::Error> {
        Self::connect_with(socket, num_queues, buf_len, false)
    }

    /// Connects, read-only if `read_only`.
    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        buf_len: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let out = b.start()?;
        let region = b.alloc_mem_region(buf_len)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            queues: out.queues,
            region,
            blkio: b,
        })
    }

    /// Capacity in bytes as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The whole shared buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a mapping of `region.len` bytes owned by this
        // client (libblkio allocated it); no request is in flight while the
        // caller holds this borrow, because every helper below waits for its
        // completion before returning.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Address of byte `off` of the shared buffer.
    pub fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.region.len);
        (self.region.addr + off) as *mut u8
    }

    /// Waits for one completion on queue `q`; returns its `ret` (0 or -errno).
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .unwrap();
        assert_eq!(n, 1, "no completion within 30 s");
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    /// Reads `len` bytes at device byte `offset` into buffer offset `buf_off`.
    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Writes `len` bytes from buffer offset `buf_off` at device byte `offset`.
    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].write(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// FLUSH.
    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    /// DISCARD of `len` bytes at `offset`.
    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// WRITE_ZEROES of `len` bytes at `offset` (`flags` e.g. NO_UNMAP).
    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, flags: ReqFlags) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait(q)
    }
}

/// A deterministic pattern for `len` bytes, different per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The events of a JSON Lines report (none if the file does not exist).
pub fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("report line {l:?}: {e}")))
        .collect()
}

/// Number of events of `kind`.
pub fn count(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

/// Runs `pinblk ctl SOCKET ARGS...`: (exited 0, the JSON it printed (the
/// command's `return` value; `Null` if not JSON), stderr).
pub fn ctl(socket: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .arg("ctl")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Runs `pinblk scrub --image IMAGE`: (exited 0, exit code, stdout + stderr).
pub fn scrub(image: &Path) -> (bool, Option<i32>, String) {
    scrub_with(image, None)
}

/// [`scrub`] with `--checksum-store STORE` when given.
pub fn scrub_with(image: &Path, store: Option<&Path>) -> (bool, Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pinblk"));
    cmd.args(["scrub", "--image"]).arg(image);
    if let Some(store) = store {
        cmd.arg("--checksum-store").arg(store);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), out.status.code(), text)
}

/// [`Server::logged`] over a log text.
pub fn count_logged(log: &str, needle: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(
            |l| match l.split_once(" more like this suppressed in the last ") {
                Some((head, _)) => head
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(1),
                None => 1,
            },
        )
        .sum()
}
