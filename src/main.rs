//! The `pinblk` binary.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use pinblk::cli::{Cli, Command, ServeArgs, CAPABILITIES};
use pinblk::device::Device;
use std::path::Path;

use pinblk::cli::{Checksum, OnOff};
use pinblk::integrity::{default_store_path, ChecksumStore, StoreOptions};
use pinblk::pin::policy::{BounceMode, PolicyConfig};
use pinblk::report::{Event, RecoveredEvent, ReportWriter};
use pinblk::storage::{Image, ImageOptions};
use pinblk::virtio_blk::config::DeviceConfig;

fn serve(args: ServeArgs) -> Result<(), String> {
    let image = Image::open(
        &args.image,
        &ImageOptions {
            create_size: args.size,
            read_only: args.read_only,
            direct: args.direct,
            logical_block_size: args.logical_block_size,
        },
    )
    .map_err(|e| e.to_string())?;
    let config = DeviceConfig {
        capacity_sectors: image.capacity_sectors(),
        logical_block_size: args.logical_block_size,
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        read_only: args.read_only,
        serial: args.serial.clone(),
    };
    log::info!(
        "serving {} ({} bytes, {} sectors{}) with {} queue(s) of up to {} entries",
        image.path().display(),
        image.size(),
        image.capacity_sectors(),
        if args.read_only { ", read-only" } else { "" },
        args.num_queues,
        args.queue_size
    );
    let mut dev = Device::new(config, image);
    dev.null = args.null;
    dev.pins = pinblk::pin::PinTracker::new(args.num_queues, args.longterm_after);
    dev.policy = PolicyConfig {
        policy: args.policy,
        bounce_always: args.bounce == BounceMode::Always,
        stall_timeout: args.stall_timeout,
        read_delay: args.inject_read_delay,
        read_delay_probability: args.inject_read_probability,
        bounce_pool_bytes: args.bounce_pool,
    };
    dev.report = ReportWriter::open(args.report.as_deref()).map_err(|e| e.to_string())?;
    dev.on_mismatch = args.on_mismatch;
    dev.pin_tracking = args.pin_tracking == OnOff::On;
    if !dev.pin_tracking {
        log::warn!("--pin-tracking off: no pins, no conflict detection, no policy");
    }
    if args.checksum == Checksum::Crc32c && !args.null {
        dev.store = open_store(&args, &dev)?;
    }
    log::info!(
        "pin model: policy {}, bounce {:?}, stall timeout {:?}, long-term after {:?}{}",
        args.policy.name(),
        args.bounce,
        args.stall_timeout,
        args.longterm_after,
        args.inject_read_delay
            .map(|d| format!(
                ", injected READ delay {d:?} (p={})",
                args.inject_read_probability
            ))
            .unwrap_or_default()
    );
    if args.null {
        log::warn!(
            "--null: READ and WRITE complete without touching the image; data is not stored"
        );
    }
    let dev = Arc::new(dev);
    pinblk::vhost::server::serve(dev.clone(), &args.socket, args.max_connections)
        .map_err(|e| e.to_string())?;
    log::info!("stopped; counters: {}", dev.counters_json());
    // Every connection is gone: the device is ours alone again.
    if let Ok(dev) = Arc::try_unwrap(dev) {
        if let Some(store) = dev.store {
            let closed = dev
                .image
                .file()
                .sync_data()
                .map_err(|e| e.to_string())
                .and_then(|()| store.close().map_err(|e| e.to_string()));
            match closed {
                Ok(()) => log::info!("checksum store closed cleanly"),
                Err(e) => log::error!(
                    "checksum store not closed cleanly ({e}); the next start recovers it"
                ),
            }
        }
    }
    Ok(())
}

/// Opens the checksum store; after an unclean shutdown, the blocks
/// re-checksummed from the image are reported as `recovered`.
fn open_store(args: &ServeArgs, dev: &Device) -> Result<Option<ChecksumStore>, String> {
    let opts = StoreOptions {
        store_path: args.checksum_store.clone(),
        image_size: Some(dev.image.size()),
        read_only: args.read_only,
    };
    let path = opts
        .store_path
        .clone()
        .unwrap_or_else(|| default_store_path(&args.image));
    if args.read_only && !path.exists() {
        log::warn!(
            "read-only device and no checksum store at {}: checksums off",
            path.display()
        );
        return Ok(None);
    }
    let (store, outcome) = ChecksumStore::open(&args.image, &opts).map_err(|e| e.to_string())?;
    if outcome.created {
        log::info!(
            "created checksum store {} from the image",
            store.path().display()
        );
    }
    if outcome.unclean {
        log::warn!(
            "checksum store {} was not closed cleanly (crash or kill -9): {} block(s) re-checksummed from the image",
            store.path().display(),
            outcome.recovered.len()
        );
    }
    for r in &outcome.recovered {
        let e = Event::new(RecoveredEvent::new(r.block, r.stored, r.found));
        if let Err(err) = dev.report.emit(&e) {
            log::error!("cannot write report event: {err}");
        }
    }
    Ok(Some(store))
}

fn report(path: &Path) -> Result<(), String> {
    let summary = pinblk::report::summary::summarize(path).map_err(|e| e.to_string())?;
    println!("{summary}");
    Ok(())
}

/// Offline verification with a progress line; `Ok(false)` on any mismatch.
fn scrub(image: &Path, store: Option<&Path>) -> Result<bool, String> {
    let store = store
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_store_path(image));
    let mut last = u64::MAX;
    let r = pinblk::integrity::scrub(image, &store, |done, total| {
        let pct = done * 100 / total.max(1);
        if pct != last {
            last = pct;
            eprint!(
                "\rscrub {}: {pct:3}% ({done}/{total} blocks of 4 KiB)",
                image.display()
            );
        }
    })
    .map_err(|e| e.to_string())?;
    eprintln!();
    for m in &r.mismatches {
        println!(
            "checksum mismatch: block {} (sector {:#x}): expected csum {:#010x}, found {:#010x}",
            m.block, m.sector, m.expected, m.found
        );
    }
    if !r.store_clean {
        println!("note: the store was not closed cleanly; `pinblk serve` recovers in-flight blocks at its next start");
    }
    println!(
        "scrub: {} blocks verified, {} mismatch(es), store generation {}",
        r.blocks,
        r.mismatches.len(),
        r.generation
    );
    Ok(r.mismatches.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if cli.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Report { path }) => report(&path),
        Some(Command::Scrub {
            image,
            checksum_store,
        }) => match scrub(&image, checksum_store.as_deref()) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        None => {
            let _ = Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinblk: error: {e}");
            ExitCode::FAILURE
        }
    }
}
