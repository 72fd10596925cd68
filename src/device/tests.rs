//! Tests of [`super::Device::open`] and [`super::DeviceOptions`].

use std::os::unix::fs::FileExt;

use super::*;
use crate::storage::StorageError;

/// Options for `dir/disk.img`, created with 1 MiB if missing.
fn opts(dir: &std::path::Path) -> DeviceOptions {
    let mut o = DeviceOptions::new(dir.join("disk.img"));
    o.image_options.create_size = Some(1 << 20);
    o
}

#[test]
fn open_builds_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.num_queues = 3;
    o.queue_size = 64;
    o.serial = "sn".into();
    o.report = Some(dir.path().join("r.jsonl"));
    o.on_mismatch = OnMismatch::Eio;
    o.policy.stall_timeout = Duration::from_millis(7);
    let dev = Device::open(&o).unwrap();
    assert_eq!(dev.config().num_queues, 3);
    assert_eq!(dev.config().queue_size, 64);
    assert_eq!(dev.config().serial, "sn");
    assert_eq!(dev.config().capacity_sectors, 2048);
    // One set per queue in each connection lane.
    assert_eq!(
        dev.queue_counters().len(),
        3 * usize::from(crate::device::MAX_CONNECTIONS)
    );
    assert_eq!(dev.image().size(), 1 << 20);
    assert!(dev.pin_tracking() && !dev.null());
    assert_eq!(dev.on_mismatch(), OnMismatch::Eio);
    assert_eq!(dev.policy(), &o.policy);
    assert_eq!(dev.report().path(), o.report.as_deref());
    assert!(dev.store().is_some());
    assert!(default_store_path(&o.image).exists());
    assert_eq!(dev.next_request_id(), 1);
    assert_eq!(dev.next_request_id(), 2);
    dev.close().unwrap();
}

#[test]
fn no_store_when_checksums_are_off_or_null() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.checksum = false;
    assert!(Device::open(&o).unwrap().store().is_none());
    o.checksum = true;
    o.null = true;
    let dev = Device::open(&o).unwrap();
    assert!(dev.store().is_none() && dev.null());
    assert!(!default_store_path(&o.image).exists());
    dev.close().unwrap();
    // Read-only without a store: checksums off, nothing created.
    o.null = false;
    o.image_options.read_only = true;
    assert!(Device::open(&o).unwrap().store().is_none());
    assert!(!default_store_path(&o.image).exists());
}

#[test]
fn typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.num_queues = 0;
    assert!(matches!(Device::open(&o), Err(DeviceError::NumQueues(0))));
    o.num_queues = 1;
    o.queue_size = 100;
    assert!(matches!(Device::open(&o), Err(DeviceError::QueueSize(100))));
    o.queue_size = 256;
    o.image_options.logical_block_size = Some(1024);
    assert!(matches!(
        Device::open(&o),
        Err(DeviceError::LogicalBlockSize(1024))
    ));
    o.image_options.logical_block_size = Some(512);

    let first = Device::open(&o).unwrap();
    let e = Device::open(&o).err().unwrap();
    assert!(
        matches!(e, DeviceError::Image(StorageError::Locked(_))),
        "{e}"
    );
    assert!(e.to_string().contains("already in use"), "{e}");
    drop(first);

    o.report = Some(dir.path().join("no/such/dir/r.jsonl"));
    let e = Device::open(&o).err().unwrap();
    assert!(matches!(e, DeviceError::Report(_)), "{e}");
    assert!(e.to_string().contains("--report"), "{e}");

    o.report = None;
    std::fs::write(default_store_path(&o.image), b"not a store").unwrap();
    let e = Device::open(&o).err().unwrap();
    assert!(matches!(e, DeviceError::Store(_)), "{e}");
    assert!(e.to_string().contains("--checksum off"), "{e}");
}

#[test]
fn unclean_store_is_recovered_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.image_options.create_size = Some(2 << 20);
    o.report = Some(dir.path().join("r.jsonl"));
    o.on_mismatch = OnMismatch::Eio;
    // A write in flight at the crash in region 0 (block 3: its checksum
    // recorded, its data never landed), then dropped without close: the
    // store stays marked in use, like kill -9.
    let dev = Device::open(&o).unwrap();
    let store = dev.store().unwrap();
    store.intent_begin(3 * 4096, 4096).unwrap();
    store.set_expected(3, 0x1234_5678).unwrap();
    drop(dev);
    // Block 300 (region 1, no write in flight) changed behind pinblk's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&o.image)
        .unwrap();
    f.write_all_at(&[0xab; 16], 300 * 4096).unwrap();
    let dev = Device::open(&o).unwrap();
    let text = std::fs::read_to_string(o.report.as_ref().unwrap()).unwrap();
    let ev: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ev.len(), 2, "{text}");
    // One `recovered` for the region, naming the block re-learned.
    assert_eq!(ev[0]["kind"], "recovered");
    assert_eq!(ev[0]["op"], "other");
    assert_eq!((&ev[0]["region"], &ev[0]["sector"]), (&0.into(), &0.into()));
    assert_eq!(ev[0]["length"], 1 << 20);
    assert_eq!(
        (&ev[0]["blocks"], &ev[0]["first_block"]),
        (&1.into(), &3.into())
    );
    assert_eq!(ev[0]["block_list"], serde_json::json!([3]));
    // A `checksum_failure` for the cold block, with no request.
    let cf = &ev[1];
    assert_eq!(cf["kind"], "checksum_failure");
    assert_eq!((&cf["block"], &cf["sector"]), (&300.into(), &2400.into()));
    assert_eq!((&cf["op"], &cf["rule"]), (&"other".into(), &"R4".into()));
    assert_eq!(cf["action"], "report", "nothing was read: no EIO");
    assert_eq!(cf["policy"], "bounce");
    for absent in ["request_id", "queue", "guest_ranges"] {
        assert!(cf.get(absent).is_none(), "{absent} in {cf}");
    }
    assert!(
        cf["detail"]
            .as_str()
            .unwrap()
            .contains("outside every write-intent region"),
        "{cf}"
    );
    let c = dev.report().counters();
    assert_eq!((c.recovered, c.checksum_failures), (1, 1));
    // The cold block keeps its stored checksum: it still fails.
    let store = dev.store().unwrap();
    let mut block = vec![0u8; 4096];
    std::fs::File::open(&o.image)
        .unwrap()
        .read_exact_at(&mut block, 300 * 4096)
        .unwrap();
    assert_eq!(store.verify(300 * 4096, &[&block]).unwrap().len(), 1);
    dev.close().unwrap();
}
