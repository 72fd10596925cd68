//! Tests of [`super::Device::open`] and [`super::DeviceOptions`].

use std::os::unix::fs::FileExt;

use super::*;

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
    assert_eq!(dev.queue_counters().len(), 3);
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
    o.image_options.logical_block_size = 1024;
    assert!(matches!(
        Device::open(&o),
        Err(DeviceError::LogicalBlockSize(1024))
    ));
    o.image_options.logical_block_size = 512;

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
    o.report = Some(dir.path().join("r.jsonl"));
    // Dropped without close: the store stays marked in use.
    drop(Device::open(&o).unwrap());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&o.image)
        .unwrap();
    f.write_all_at(&[0xab; 16], 3 * 4096).unwrap();
    let dev = Device::open(&o).unwrap();
    let text = std::fs::read_to_string(o.report.as_ref().unwrap()).unwrap();
    let ev: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ev.len(), 1, "{text}");
    assert_eq!(ev[0]["kind"], "recovered");
    assert_eq!(ev[0]["block"], 3);
    dev.close().unwrap();
}
