//! The `pinblk` binary: parses the command line, runs the subcommand, and
//! turns any error into one line `pinblk: error: ...` on stderr and a
//! non-zero exit status (2 for a usage error, 1 otherwise).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use pinblk::cli::{ArgsError, Cli, Command, ServeArgs, CAPABILITIES};
use pinblk::device::{Device, DeviceError, DeviceOptions};
use pinblk::integrity::{default_store_path, IntegrityError};
use pinblk::report::ReportError;
use pinblk::vhost::server::ServeError;

/// Everything that makes `pinblk` exit with an error. Each message says what
/// went wrong and what to do; `main` prints it once.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// Arguments that contradict each other (exit status 2).
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// The device cannot be opened.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The socket or a connection failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// `pinblk report`: the report file cannot be read.
    #[error("{0}; pass the file written by `pinblk serve --report`")]
    Report(#[from] ReportError),
    /// `pinblk scrub`: the image or its store cannot be read.
    #[error("{}", scrub_message(.0))]
    Scrub(#[from] IntegrityError),
    /// `pinblk scrub` of a block device without `--checksum-store`.
    #[error("{0} is a block device: there is no store beside it; pass --checksum-store PATH (the store `pinblk serve` used)")]
    ScrubStoreRequired(std::path::PathBuf),
}

/// The message of [`Error::Scrub`]: the store's own message, which says what
/// to do, except for a plain I/O error, which gets a remedy here.
fn scrub_message(e: &IntegrityError) -> String {
    match e {
        IntegrityError::Io { .. } => {
            format!("{e}; check the --image and --checksum-store paths and their permissions")
        }
        _ => e.to_string(),
    }
}

impl Error {
    /// The exit status: 2 for a usage error (as for a bad flag), 1 otherwise.
    fn exit_code(&self) -> ExitCode {
        match self {
            Error::Args(_) | Error::ScrubStoreRequired(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Error> {
    let socket: PathBuf = args.socket.clone();
    let max_connections = args.max_connections;
    let opts = DeviceOptions::try_from(args)?;
    let dev = Arc::new(Device::open(&opts)?);
    pinblk::vhost::server::serve(dev.clone(), &socket, max_connections)?;
    log::info!("stopped; counters: {}", dev.counters_json());
    // Every connection is gone: the device is ours alone again.
    if let Ok(dev) = Arc::try_unwrap(dev) {
        let had_store = dev.store().is_some();
        match dev.close() {
            Ok(()) if had_store => log::info!("checksum store closed cleanly"),
            Ok(()) => {}
            Err(e) => log::error!("checksum store not closed cleanly ({e})"),
        }
    }
    Ok(())
}

fn report(path: &Path) -> Result<(), Error> {
    let summary = pinblk::report::summary::summarize(path)?;
    println!("{summary}");
    Ok(())
}

/// Offline verification with a progress line; `Ok(false)` on any mismatch
/// that fails the scrub (any on a clean store; outside every marked
/// write-intent region on a store not closed cleanly).
fn scrub(image: &Path, store: Option<&Path>) -> Result<bool, Error> {
    if store.is_none() && pinblk::storage::blockdev::is_block_device(image) {
        return Err(Error::ScrubStoreRequired(image.to_path_buf()));
    }
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
    })?;
    eprintln!();
    for m in &r.mismatches {
        print!(
            "checksum mismatch: block {} (sector {:#x}): expected csum {:#010x}, found {:#010x}",
            m.block, m.sector, m.expected, m.found
        );
        if m.in_intent_region {
            print!("; in a write-intent region (may have been in flight; `pinblk serve` will re-learn it)");
        }
        println!();
    }
    if !r.store_clean {
        println!(
            "note: the store was not closed cleanly; {} write-intent region(s) marked: mismatches in them may be writes in flight, which `pinblk serve` re-learns at its next start; any other mismatch is a failure",
            r.marked_regions
        );
    }
    println!(
        "scrub: {} blocks verified, {} mismatch(es), {} failing, store generation {}",
        r.blocks,
        r.mismatches.len(),
        r.failures(),
        r.generation
    );
    Ok(r.ok())
}

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    if let Err(e) = pinblk::logging::init() {
        eprintln!("pinblk: cannot install the logger: {e}");
    }
    if cli.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Serve(args)) => serve(*args),
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
            let _ = Cli::print_help();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinblk: error: {e}");
            e.exit_code()
        }
    }
}
