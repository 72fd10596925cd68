//! pinblk against a hostile or buggy vhost-user frontend (issue 13): the
//! real binary over a real socket, driven by the hand-built frontend of
//! `tests/common/frontend.rs` (raw split rings in a test-owned memfd).

mod common;

use std::time::Duration;

use common::frontend::*;
use common::Server;

const MIB: u64 = 1 << 20;

/// The frontend itself works: a WRITE, a READ of it back and a FLUSH
/// complete with VIRTIO_BLK_S_OK and the right used lengths.
#[test]
fn frontend_smoke_write_read_flush() {
    let server = Server::start(4 * MIB, &[]);
    let mut f = TestFrontend::connect(&server.socket, GuestLayout::new(4 * MIB).with_event_idx());
    f.start_queue(0, RingLayout::at(0, 256)).unwrap();
    let arena = Arena {
        meta: 64 * 1024,
        data: MIB,
        stride: 4096,
    };
    let data = common::pattern(7, 4096);
    f.write_mem(arena.data, &data);
    let w = f.write_request(0, Arena::first_desc(0), &arena.write(0, 8));
    f.publish(0, &[w]);
    f.kick(0);
    f.wait_used(0, 1, Duration::from_secs(10)).unwrap();
    assert_eq!(f.used_elem(0, 0), (u32::from(w), 1));
    assert_eq!(f.read_u8(arena.write(0, 8).status), VIRTIO_BLK_S_OK);

    let r = f.write_request(0, Arena::first_desc(1), &arena.read(1, 8));
    let fl = f.write_request(0, Arena::first_desc(2), &arena.flush(2));
    f.publish(0, &[r, fl]);
    f.kick(0);
    f.wait_used(0, 3, Duration::from_secs(10)).unwrap();
    assert_eq!(f.read_u8(arena.read(1, 8).status), VIRTIO_BLK_S_OK);
    assert_eq!(f.read_u8(arena.flush(2).status), VIRTIO_BLK_S_OK);
    assert_eq!(f.read_mem(arena.data + 4096, 4096), data);
    let mut used: Vec<_> = (1..3).map(|i| f.used_elem(0, i)).collect();
    used.sort();
    let mut want = vec![(u32::from(r), 4097), (u32::from(fl), 1)];
    want.sort();
    assert_eq!(used, want);
    assert_eq!(f.get_vring_base(0).unwrap(), 3);
}

/// A pinblk on a 4 MiB image with `extra` options, and a frontend on 4 MiB
/// of guest memory (EVENT_IDX if `event_idx`) with queue 0 started on a
/// ring of `size` entries at GPA 0.
fn setup(extra: &[&str], event_idx: bool, size: u16) -> (Server, TestFrontend) {
    let server = Server::start(4 * MIB, extra);
    let mut layout = GuestLayout::new(4 * MIB);
    layout.event_idx = event_idx;
    let mut f = TestFrontend::connect(&server.socket, layout);
    f.start_queue(0, RingLayout::at(0, size)).unwrap();
    (server, f)
}

/// The arena for requests of queue 0 after a ring of `size` entries at GPA
/// 0: headers from 1 MiB, 4 KiB data buffers from 2 MiB.
fn arena(stride: u32) -> Arena {
    Arena {
        meta: MIB,
        data: 2 * MIB,
        stride,
    }
}

/// Writes READ `n` (of `len` bytes at sector 8n modulo the image) on queue 0.
fn put_read(f: &TestFrontend, a: &Arena, n: u16) -> u16 {
    f.write_request(
        0,
        Arena::first_desc(n),
        &a.read(n, (8 * u64::from(n)) % 4096),
    )
}

/// Checks the used ring of queue 0 after a ring stop: exactly `base`
/// requests were popped (`base` = GET_VRING_BASE's answer, requests
/// published in order from avail index 0), and each of them, and nothing
/// else, is in the used ring with its status written: no popped head lost.
fn assert_no_head_lost(f: &TestFrontend, a: &Arena, heads: &[u16], base: u32) {
    let used = f.used_idx(0);
    assert_eq!(
        u32::from(used),
        base,
        "GET_VRING_BASE said {base} requests were popped, the used ring holds {used}"
    );
    let mut got: Vec<u16> = (0..used).map(|i| f.used_elem(0, i).0 as u16).collect();
    got.sort_unstable();
    let mut want: Vec<u16> = heads[..base as usize].to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "the used heads are not the popped ones");
    for n in 0..base as u16 {
        assert_eq!(
            f.read_u8(a.read(n, 0).status),
            VIRTIO_BLK_S_OK,
            "status of request {n}"
        );
    }
}

/// Finding 1 (issue 13): GET_VRING_BASE while the ring holds ~250 valid
/// READs in flight, EVENT_IDX negotiated. The ring stop answers within 10 s
/// and every popped request is in the used ring before the answer.
#[test]
fn get_vring_base_with_250_requests_in_flight_under_event_idx() {
    let (server, mut f) = setup(
        &["--queue-size", "1024", "--inject-read-delay", "300ms"],
        true,
        1024,
    );
    let a = arena(4096);
    let heads: Vec<u16> = (0..250).map(|n| put_read(&f, &a, n)).collect();
    // Published at once and kicked; the ring stop follows at once, so that
    // it lands while the worker is still popping (what a VM stop does to a
    // busy queue).
    f.publish(0, &heads);
    f.kick(0);
    let t = std::time::Instant::now();
    let base = f.get_vring_base(0);
    let took = t.elapsed();
    let base = base.unwrap_or_else(|e| {
        panic!(
            "GET_VRING_BASE failed after {took:?}: {e:?}\n{}",
            server.log_text()
        )
    });
    assert!(
        took < Duration::from_secs(10),
        "GET_VRING_BASE took {took:?}"
    );
    assert_no_head_lost(&f, &a, &heads, base);
    // Nothing is pushed after the answer.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        u32::from(f.used_idx(0)),
        base,
        "used ring changed after the ring stopped"
    );
}
