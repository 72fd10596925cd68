//! The `pinblk` binary.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use pinblk::cli::{Cli, Command, ServeArgs, CAPABILITIES};
use pinblk::device::Device;
use pinblk::integrity::report::ReportWriter;
use pinblk::storage::{Image, ImageOptions};
use pinblk::transport::config::DeviceConfig;
use pinblk::worker::policy::{BounceMode, PolicyConfig};

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
    pinblk::transport::server::serve(dev.clone(), &args.socket, args.max_connections)
        .map_err(|e| e.to_string())?;
    log::info!(
        "stopped; counters: {}",
        serde_json::to_string(&dev.counters()).unwrap_or_default()
    );
    Ok(())
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
