//! Unit tests of the command line ([`super`]).
use super::*;

#[test]
fn sizes() {
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    assert_eq!(parse_size("64m").unwrap(), 64 << 20);
    assert!(parse_size("1X").is_err());
    assert!(parse_size("abc").is_err());
    assert_eq!(parse_transfer("32M").unwrap(), 32 << 20);
    assert!(parse_transfer("4G").is_err());
}

#[test]
fn cli_is_consistent() {
    Cli::command().debug_assert();
}

fn serve_args(extra: &[&str]) -> ServeArgs {
    let mut argv = vec![
        "pinblk", "serve", "--socket", "s.sock", "--image", "disk.img",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Some(Command::Serve(a)) => *a,
        other => panic!("not serve: {other:?}"),
    }
}

#[test]
fn serve_defaults_are_device_defaults() {
    let opts = DeviceOptions::try_from(serve_args(&[])).unwrap();
    assert_eq!(opts, DeviceOptions::new("disk.img"));
}

#[test]
fn serve_args_convert() {
    let opts = DeviceOptions::try_from(serve_args(&[
        "--size",
        "1M",
        "--num-queues",
        "4",
        "--queue-size",
        "128",
        "--read-only",
        "--serial",
        "s1",
        "--logical-block-size",
        "4096",
        "--direct",
        "--aio",
        "io_uring",
        "--policy",
        "stall",
        "--bounce",
        "always",
        "--stall-timeout",
        "5ms",
        "--longterm-after",
        "2s",
        "--bounce-pool",
        "1M",
        "--bounce-queue-max",
        "512K",
        "--max-transfer",
        "2M",
        "--inject-read-delay",
        "20ms",
        "--inject-read-probability",
        "0.5",
        "--pin-tracking",
        "off",
        "--checksum-store",
        "x.pinsum",
        "--on-mismatch",
        "eio",
        "--report",
        "r.jsonl",
        "--null",
        "--poll-max-us",
        "0",
    ]))
    .unwrap();
    let want = DeviceOptions {
        image_options: ImageOptions {
            create_size: Some(1 << 20),
            read_only: true,
            direct: true,
            logical_block_size: Some(4096),
            aio: Aio::IoUring,
        },
        num_queues: 4,
        queue_size: 128,
        serial: "s1".into(),
        null: true,
        pin_tracking: false,
        longterm_after: Duration::from_secs(2),
        policy: PolicyConfig {
            policy: Policy::Stall,
            bounce_always: true,
            stall_timeout: Duration::from_millis(5),
            read_delay: Some(Duration::from_millis(20)),
            read_delay_probability: 0.5,
            bounce_pool_bytes: 1 << 20,
            bounce_queue_bytes: 512 << 10,
        },
        checksum: true,
        checksum_store: Some("x.pinsum".into()),
        on_mismatch: OnMismatch::Eio,
        report: Some("r.jsonl".into()),
        max_transfer: 2 << 20,
        poll_max: Duration::ZERO,
        ..DeviceOptions::new("disk.img")
    };
    assert_eq!(opts, want);
    let off = DeviceOptions::try_from(serve_args(&["--checksum", "off"])).unwrap();
    assert!(!off.checksum);
}

#[test]
fn checksum_store_needs_checksums() {
    let e = DeviceOptions::try_from(serve_args(&[
        "--checksum",
        "off",
        "--checksum-store",
        "x.pinsum",
    ]))
    .unwrap_err();
    assert_eq!(
        e,
        ArgsError::ChecksumStoreWithChecksumOff("x.pinsum".into())
    );
    assert!(e.to_string().contains("--checksum crc32c"), "{e}");
}
