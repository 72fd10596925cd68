//! Integration tests: pinblk serving host block devices (loop devices with
//! 512- and 4096-byte sectors), driven by libblkio over its socket.
//!
//! Loop devices need root and the loop driver. Where they cannot be created
//! at all (not root, no /dev/loop-control, `losetup` missing), each test
//! prints why and returns; any other failure to set one up fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::{pattern, scrub_with, Client, Server};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A loop device over a sparse backing file; detached on drop (also when a
/// test fails).
struct LoopDev {
    dev: PathBuf,
    backing: PathBuf,
}

impl LoopDev {
    /// Attaches a `SIZE`-byte sparse file `dir/name` with `sector_size`-byte
    /// sectors, or `None` (with the reason printed) where loop devices are
    /// unavailable on this machine.
    fn new(dir: &Path, name: &str, sector_size: u32) -> Option<LoopDev> {
        Self::new_with(dir, name, sector_size, false)
    }

    /// [`LoopDev::new`], read-only (`losetup -r`) if `read_only`.
    fn new_with(dir: &Path, name: &str, sector_size: u32, read_only: bool) -> Option<LoopDev> {
        if let Some(why) = loop_unavailable() {
            eprintln!("SKIPPED: loop devices unavailable on this machine: {why}");
            return None;
        }
        let backing = dir.join(name);
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector_size.to_string()])
            .args(if read_only { &["-r"][..] } else { &[] })
            .arg(&backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Some(LoopDev { dev, backing })
    }

    fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }

    /// `/sys/block/loopN/queue/NAME` as a number.
    fn queue(&self, name: &str) -> u64 {
        let n = self.dev.file_name().unwrap().to_str().unwrap();
        std::fs::read_to_string(format!("/sys/block/{n}/queue/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Why loop devices cannot be used here, or `None` when they can.
fn loop_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop driver not loaded)".into());
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("losetup not installed".into());
    }
    None
}

/// Starts pinblk on `dev` with its checksum store in the server's temp dir.
fn serve(dev: &LoopDev, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("dev.pinsum");
    let mut args = vec!["--checksum-store", store.to_str().unwrap()];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in(dir, dev.dev.clone(), &[], &args)
}

/// Runs `pinblk serve` expecting it to fail at start; returns its stderr.
fn serve_fails(image: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--image", image])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "pinblk started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The libblkio cases of tests/blkio_client.rs against a loop device of
/// `sector_size`-byte sectors: geometry, write/flush/read-back at the first
/// and last block, discard, write-zeroes with and without unmap; then the
/// backing file holds the bytes, pinblk stops cleanly and scrub passes.
fn loop_device_cases(sector_size: u32, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dev) = LoopDev::new(tmp.path(), "backing.img", sector_size) else {
        return;
    };
    assert_eq!(dev.queue("logical_block_size"), u64::from(sector_size));
    let srv = serve(&dev, extra);
    let mut c = Client::connect(&srv.socket, 1, 2 * MIB as usize).unwrap();
    let cap = c.capacity();
    assert_eq!(cap, SIZE);
    let ss = i64::from(sector_size);
    assert_eq!(
        i64::from(c.blkio.get_i32("request-alignment").unwrap()),
        ss,
        "logical block size in the config space"
    );
    assert!(dev.queue("discard_max_bytes") > 0 && dev.queue("write_zeroes_max_bytes") > 0);
    assert!(
        c.blkio.get_u64("max-discard-len").unwrap() > 0,
        "DISCARD offered"
    );
    assert!(
        c.blkio.get_u64("max-write-zeroes-len").unwrap() > 0,
        "WRITE_ZEROES offered"
    );
    assert_eq!(
        i64::from(c.blkio.get_i32("discard-alignment").unwrap()),
        (dev.queue("discard_granularity") as i64).max(ss)
    );

    c.write_flush_read_back(&[0, cap - 4096, 12345 * 4096]);
    // A large multi-segment transfer.
    let data = pattern(7, MIB as usize);
    c.buf()[..MIB as usize].copy_from_slice(&data);
    assert_eq!(c.write(0, 3 * MIB, 0, MIB as usize), 0);
    assert_eq!(c.read(0, 3 * MIB, MIB as usize, MIB as usize), 0);
    assert_eq!(&c.buf()[MIB as usize..2 * MIB as usize], &data[..]);

    // DISCARD reads back zeros.
    c.buf()[..65536].fill(0xab);
    assert_eq!(c.write(0, 8 * MIB, 0, 65536), 0);
    assert_eq!(c.discard(0, 8 * MIB, 65536), 0);
    c.buf()[..65536].fill(0x55);
    assert_eq!(c.read(0, 8 * MIB, 0, 65536), 0);
    assert!(
        c.buf()[..65536].iter().all(|&b| b == 0),
        "discarded range reads zeros"
    );

    // WRITE_ZEROES with and without UNMAP.
    for (i, flags) in [ReqFlags::empty(), ReqFlags::NO_UNMAP]
        .into_iter()
        .enumerate()
    {
        let off = (i as u64 + 10) * MIB;
        c.buf()[..32768].fill(0xcd);
        assert_eq!(c.write(0, off, 0, 32768), 0);
        assert_eq!(c.write_zeroes(0, off + 4096, 8192, flags), 0, "{flags:?}");
        assert_eq!(c.read(0, off, 0, 32768), 0);
        let b = &c.buf()[..32768];
        assert!(b[..4096].iter().all(|&x| x == 0xcd));
        assert!(b[4096..12288].iter().all(|&x| x == 0), "zeroed, {flags:?}");
        assert!(b[12288..].iter().all(|&x| x == 0xcd));
    }
    assert_eq!(c.flush(0), 0);
    drop(c);

    let store = srv.dir.path().join("dev.pinsum");
    let (st, log, dir) = srv.stop_keeping_dir(libc::SIGTERM);
    assert!(st.success(), "{log}");
    assert!(
        log.contains(r#""checksum_failures":0"#) && log.contains(r#""ioerr":0"#),
        "{log}"
    );
    // The device's bytes are in the backing file.
    let img = std::fs::read(&dev.backing).unwrap();
    assert_eq!(&img[(cap - 4096) as usize..], &pattern(2, 4096)[..]);
    assert!(img[8 * MIB as usize..8 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0));
    // Scrub reads the device against its store.
    let (ok, _, text) = scrub_with(Path::new(dev.path()), Some(&store));
    assert!(ok, "scrub: {text}");
    // Without --checksum-store scrub says what to add.
    let out = Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .args(["scrub", "--image", dev.path()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("pass --checksum-store PATH"), "{err}");
    drop(dir);
}

#[test]
fn loop_device_512_byte_sectors() {
    loop_device_cases(512, &[]);
}

#[test]
fn loop_device_4096_byte_sectors_direct() {
    loop_device_cases(4096, &["--direct"]);
}

#[test]
fn block_device_without_checksum_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dev) = LoopDev::new(tmp.path(), "b.img", 512) else {
        return;
    };
    let err = serve_fails(dev.path(), &[]);
    assert!(
        err.contains("is a block device") && err.contains("pass --checksum-store PATH"),
        "{err}"
    );
    // With checksums off no store is needed.
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir, dev.dev.clone(), &[], &["--checksum", "off"]);
    let c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    assert_eq!(c.capacity(), SIZE);
}

#[test]
fn store_made_for_another_device_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(a) = LoopDev::new(tmp.path(), "a.img", 512) else {
        return;
    };
    let b = LoopDev::new(tmp.path(), "b.img", 512).unwrap();
    let srv = serve(&a, &[]);
    let (st, log, dir) = srv.stop_keeping_dir(libc::SIGTERM);
    assert!(st.success(), "{log}");
    let store = dir.path().join("dev.pinsum");
    assert!(store.exists());
    // Same size, another device: refused, naming both.
    let err = serve_fails(b.path(), &["--checksum-store", store.to_str().unwrap()]);
    assert!(
        err.contains("was made for block device")
            && err.contains("a.img")
            && err.contains("b.img")
            && err.contains("remove"),
        "{err}"
    );
    // A store made for an image file is refused for a device too.
    let file = tmp.path().join("file.img");
    std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
    let fsrv = Server::start_in(tempfile::tempdir().unwrap(), file.clone(), &[], &[]);
    let (st, log) = fsrv.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
    let fstore = tmp.path().join("file.img.pinsum");
    let err = serve_fails(a.path(), &["--checksum-store", fstore.to_str().unwrap()]);
    assert!(err.contains("was made for an image file"), "{err}");
    // And the device's own store still serves it.
    let srv = Server::start_in(
        dir,
        a.dev.clone(),
        &[],
        &["--checksum-store", store.to_str().unwrap()],
    );
    Client::connect(&srv.socket, 1, MIB as usize).unwrap();
}

#[test]
fn second_pinblk_on_same_device_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dev) = LoopDev::new(tmp.path(), "c.img", 4096) else {
        return;
    };
    let srv = serve(&dev, &[]);
    let other = tmp.path().join("other.pinsum");
    let err = serve_fails(dev.path(), &["--checksum-store", other.to_str().unwrap()]);
    assert!(
        err.contains("is busy") && err.contains("another pinblk"),
        "{err}"
    );
    // The first one still serves.
    let c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    assert_eq!(c.capacity(), SIZE);
    // And a smaller logical block than the device's is refused with O_DIRECT.
    drop(c);
    drop(srv);
    let err = serve_fails(
        dev.path(),
        &[
            "--checksum-store",
            other.to_str().unwrap(),
            "--direct",
            "--logical-block-size",
            "512",
        ],
    );
    assert!(
        err.contains("smaller than the 4096-byte logical block"),
        "{err}"
    );
}

#[test]
fn read_only_device_is_served_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dev) = LoopDev::new_with(tmp.path(), "ro.img", 512, true) else {
        return;
    };
    // Not asked for --read-only: BLKROGET / the refused write open tell.
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir, dev.dev.clone(), &[], &["--checksum", "off"]);
    // libblkio refuses a read-write connection to a VIRTIO_BLK_F_RO device.
    assert!(Client::connect(&srv.socket, 1, MIB as usize).is_err());
    let mut c = Client::connect_with(&srv.socket, 1, MIB as usize, true).unwrap();
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert!(
        srv.log_text().contains("serving it read-only"),
        "{}",
        srv.log_text()
    );
}
