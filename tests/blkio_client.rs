//! Integration tests: the real `pinblk` binary driven by libblkio over its socket.

mod common;

use blkio::ReqFlags;
use common::{pattern, Client, Server};

const MIB: u64 = 1 << 20;

#[test]
fn write_flush_read_back_at_first_and_last_block() {
    let srv = Server::start(64 * MIB, &[]);
    let mut c = Client::connect(&srv.socket, 1, 2 * MIB as usize).unwrap();
    let cap = c.capacity();
    assert_eq!(cap, 64 * MIB);
    c.write_flush_read_back(&[0, cap - 4096, 12345 * 512]);
    // The image file holds the same bytes.
    let img = std::fs::read(&srv.image).unwrap();
    assert_eq!(&img[(cap - 4096) as usize..], &pattern(2, 4096)[..]);
}

#[test]
fn large_multi_segment_io_round_trips() {
    let srv = Server::start(64 * MIB, &[]);
    let mut c = Client::connect(&srv.socket, 1, 4 * MIB as usize).unwrap();
    let data = pattern(7, MIB as usize);
    c.buf()[..MIB as usize].copy_from_slice(&data);
    assert_eq!(c.write(0, 3 * MIB, 0, MIB as usize), 0);
    assert_eq!(c.read(0, 3 * MIB, 2 * MIB as usize, MIB as usize), 0);
    assert_eq!(&c.buf()[2 * MIB as usize..3 * MIB as usize], &data[..]);
}

#[test]
fn discard_then_read_zeros() {
    let srv = Server::start(16 * MIB, &[]);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    c.buf()[..65536].fill(0xab);
    assert_eq!(c.write(0, MIB, 0, 65536), 0);
    assert_eq!(c.discard(0, MIB, 65536), 0);
    c.buf()[..65536].fill(0x55);
    assert_eq!(c.read(0, MIB, 0, 65536), 0);
    assert!(
        c.buf()[..65536].iter().all(|&b| b == 0),
        "discarded range reads zeros"
    );
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let srv = Server::start(16 * MIB, &[]);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    for (i, flags) in [ReqFlags::empty(), ReqFlags::NO_UNMAP]
        .into_iter()
        .enumerate()
    {
        let off = (i as u64 + 1) * MIB;
        c.buf()[..32768].fill(0xcd);
        assert_eq!(c.write(0, off, 0, 32768), 0);
        assert_eq!(
            c.write_zeroes(0, off + 4096, 8192, flags),
            0,
            "write-zeroes {flags:?}"
        );
        assert_eq!(c.read(0, off, 0, 32768), 0);
        let b = &c.buf()[..32768];
        assert!(b[..4096].iter().all(|&x| x == 0xcd));
        assert!(
            b[4096..12288].iter().all(|&x| x == 0),
            "zeroed range, flags {flags:?}"
        );
        assert!(b[12288..].iter().all(|&x| x == 0xcd));
    }
}

#[test]
fn two_queues_at_once() {
    let srv = Server::start(64 * MIB, &["--num-queues", "2"]);
    let mut c = Client::connect(&srv.socket, 2, 4 * MIB as usize).unwrap();
    assert_eq!(c.queues.len(), 2);
    // Keep 8 writes in flight on each queue at the same time, then read back.
    let per = 8usize;
    for q in 0..2 {
        for i in 0..per {
            let k = q * per + i;
            let data = pattern(100 + k as u64, 65536);
            c.buf()[k * 65536..(k + 1) * 65536].copy_from_slice(&data);
        }
    }
    for q in 0..2 {
        for i in 0..per {
            let k = q * per + i;
            let p = c.ptr(k * 65536);
            c.queues[q].write(k as u64 * 65536, p, 65536, k, ReqFlags::empty());
        }
    }
    for q in 0..2 {
        for _ in 0..per {
            assert_eq!(c.wait(q), 0);
        }
    }
    let half = 2 * MIB as usize;
    for k in 0..2 * per {
        let q = k % 2;
        assert_eq!(c.read(q, k as u64 * 65536, half, 65536), 0);
        assert_eq!(
            &c.buf()[half..half + 65536],
            &pattern(100 + k as u64, 65536)[..],
            "block {k}"
        );
    }
}

#[test]
fn read_past_capacity_fails_with_eio() {
    let srv = Server::start(8 * MIB, &[]);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    let cap = c.capacity();
    assert_eq!(c.read(0, cap, 0, 4096), -libc::EIO);
    assert_eq!(c.read(0, cap - 4096, 0, 8192), -libc::EIO);
    // The device goes on serving.
    assert_eq!(c.read(0, cap - 4096, 0, 4096), 0);
    assert!(
        srv.log_text().contains("past capacity"),
        "{}",
        srv.log_text()
    );
}

#[test]
fn read_only_device_is_offered_read_only() {
    let srv = Server::start(8 * MIB, &["--read-only"]);
    // libblkio refuses a read-write connection to a VIRTIO_BLK_F_RO device.
    let err = Client::connect(&srv.socket, 1, MIB as usize)
        .err()
        .expect("read-write connect refused");
    assert_eq!(err.errno().raw_os_error(), libc::EROFS, "{err:?}");
    let mut c = Client::connect_with(&srv.socket, 1, MIB as usize, true).unwrap();
    assert!(c.blkio.get_bool("read-only").unwrap());
    assert_eq!(c.read(0, 0, 0, 4096), 0);
}

#[test]
fn twenty_connect_disconnect_cycles() {
    let srv = Server::start(16 * MIB, &["--num-queues", "2"]);
    for i in 0..20u64 {
        let mut c = Client::connect(&srv.socket, 2, MIB as usize)
            .unwrap_or_else(|e| panic!("cycle {i}: connect failed: {e:?}\n{}", srv.log_text()));
        let data = pattern(i, 4096);
        c.buf()[..4096].copy_from_slice(&data);
        let q = (i % 2) as usize;
        assert_eq!(
            c.write(q, i * 4096, 0, 4096),
            0,
            "cycle {i}\n{}",
            srv.log_text()
        );
        assert_eq!(
            c.read(q, i * 4096, 4096, 4096),
            0,
            "cycle {i}\n{}",
            srv.log_text()
        );
        assert_eq!(&c.buf()[4096..8192], &data[..], "cycle {i}");
        drop(c);
    }
    // Data of every cycle survived the reconnects.
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    for i in 0..20u64 {
        assert_eq!(c.read(0, i * 4096, 0, 4096), 0);
        assert_eq!(&c.buf()[..4096], &pattern(i, 4096)[..]);
    }
}

#[test]
fn sigterm_stops_cleanly() {
    let srv = Server::start(8 * MIB, &[]);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    let socket = srv.socket.clone();
    let (st, _) = srv.stop(libc::SIGTERM);
    assert!(st.success(), "exit status {st:?}");
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
fn second_pinblk_on_same_image_is_refused() {
    let srv = Server::start(8 * MIB, &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .args(["serve", "--socket"])
        .arg(srv.dir.path().join("other.sock"))
        .arg("--image")
        .arg(&srv.image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use by another pinblk"), "{err}");
}

#[test]
fn socket_is_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let srv = Server::start(8 * MIB, &[]);
    let mode = std::fs::metadata(&srv.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn print_capabilities_answers_as_vhost_user_json_asks() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "block");
    let f: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(f.contains(&"read-only-mode") && f.contains(&"blk-file"));
}

/// Not a test on its own: the client process that
/// `killed_client_does_not_take_pinblk_down` starts and kills with SIGKILL
/// in the middle of its I/O.
#[test]
#[ignore = "run as a child process by killed_client_does_not_take_pinblk_down"]
fn child_client_writes_until_killed() {
    let Ok(socket) = std::env::var("PINBLK_CHILD_SOCKET") else {
        return;
    };
    let mut c = Client::connect(std::path::Path::new(&socket), 2, 4 * MIB as usize).unwrap();
    println!("child connected");
    let mut i = 0u64;
    loop {
        for q in 0..2 {
            for k in 0..16u64 {
                let p = c.ptr(((q as u64 * 16 + k) * 65536) as usize);
                c.queues[q].write(((i + k) % 128) * 65536, p, 65536, 0, ReqFlags::empty());
            }
        }
        for q in 0..2 {
            for _ in 0..16 {
                assert_eq!(c.wait(q), 0);
            }
        }
        i += 16;
    }
}

#[test]
fn killed_client_does_not_take_pinblk_down() {
    let srv = Server::start(16 * MIB, &["--num-queues", "2"]);
    for round in 0..3 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_client_writes_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env("PINBLK_CHILD_SOCKET", &srv.socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until it is connected and writing, then SIGKILL it mid-I/O.
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("child connected") {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
                "child exited early"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        child.kill().unwrap();
        child.wait().unwrap();
        // pinblk drains what was in flight and listens again.
        let mut c = Client::connect(&srv.socket, 2, MIB as usize).unwrap_or_else(|e| {
            panic!(
                "round {round}: reconnect after a killed client: {e:?}\n{}",
                srv.log_text()
            )
        });
        c.buf()[..4096].copy_from_slice(&pattern(round, 4096));
        assert_eq!(c.write(1, 200 * 65536, 0, 4096), 0);
        assert_eq!(c.read(0, 200 * 65536, 4096, 4096), 0);
        assert_eq!(&c.buf()[4096..8192], &pattern(round, 4096)[..]);
    }
    let log = srv.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
