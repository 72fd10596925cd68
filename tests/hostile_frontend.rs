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
