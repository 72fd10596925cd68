//! Command line of the `pinblk` binary (clap). The only module that knows
//! clap: its value enums ([`PolicyArg`], [`BounceArg`], [`OnMismatchArg`],
//! [`OnOff`], [`Checksum`], [`AioArg`]) convert into the domain types, and
//! [`ServeArgs`] into a [`DeviceOptions`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::device::DeviceOptions;
use crate::integrity::OnMismatch;
use crate::pin::policy::{BounceMode, Policy, PolicyConfig};
use crate::storage::{Aio, ImageOptions};

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// `--checksum`: whether writes are checksummed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Checksum {
    /// CRC32C per 4 KiB block (btrfs' default, fio's verify=crc32c).
    Crc32c,
    /// No checksums (no torn-write or verification reports).
    Off,
}

/// `--aio`: which engine carries READ and WRITE (converts into [`Aio`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AioArg {
    /// `mmap` for a fully allocated regular file on tmpfs or ramfs opened
    /// without --direct, `io_uring` otherwise (the start-up log says which, and why).
    Auto,
    /// io_uring readv/writev on the image (asynchronous).
    #[value(name = "io_uring")]
    IoUring,
    /// memcpy between guest memory and a shared mapping of the image: on the
    /// queue's thread below 64 KiB, on its copier thread above (fastest for
    /// an image in memory; a page-cache miss blocks the copy on the disk).
    Mmap,
}

impl From<AioArg> for Aio {
    fn from(a: AioArg) -> Aio {
        match a {
            AioArg::Auto => Aio::Auto,
            AioArg::IoUring => Aio::IoUring,
            AioArg::Mmap => Aio::Mmap,
        }
    }
}

/// `--policy`: what to do with a request that touches guest pages still
/// under DMA (converts into [`Policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// Zero-copy always; conflicts are only detected and reported (what a
    /// QEMU `cache=none` guest on btrfs or dm-integrity sees).
    Passthrough,
    /// Copy a conflicting WRITE's data to a private buffer first and write the
    /// copy; land a conflicting READ in a private buffer copied to the guest
    /// at completion (kernel: block/bounce.c, Jan Kara's "bounce pinned pages").
    Bounce,
    /// Hold the conflicting request until the conflicting pins are released,
    /// bounded by `--stall-timeout`, then bounce (kernel: folio_wait_stable(),
    /// "wait for the unpin").
    Stall,
    /// Complete the conflicting request with VIRTIO_BLK_S_IOERR.
    Fail,
}

impl From<PolicyArg> for Policy {
    fn from(a: PolicyArg) -> Policy {
        match a {
            PolicyArg::Passthrough => Policy::Passthrough,
            PolicyArg::Bounce => Policy::Bounce,
            PolicyArg::Stall => Policy::Stall,
            PolicyArg::Fail => Policy::Fail,
        }
    }
}

/// `--bounce`: which writes are copied before they are written (converts
/// into [`BounceMode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BounceArg {
    /// Only writes the policy decides to bounce.
    Conflicts,
    /// Every write (full stable-pages protection, at memcpy cost).
    Always,
}

impl From<BounceArg> for BounceMode {
    fn from(a: BounceArg) -> BounceMode {
        match a {
            BounceArg::Conflicts => BounceMode::Conflicts,
            BounceArg::Always => BounceMode::Always,
        }
    }
}

/// `--on-mismatch`: what a READ gets when a block fails verification
/// (converts into [`OnMismatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnMismatchArg {
    /// Report the checksum failure; the READ completes with the data.
    Report,
    /// Report it and complete the READ with VIRTIO_BLK_S_IOERR (as btrfs and dm-integrity do).
    Eio,
}

impl From<OnMismatchArg> for OnMismatch {
    fn from(a: OnMismatchArg) -> OnMismatch {
        match a {
            OnMismatchArg::Report => OnMismatch::Report,
            OnMismatchArg::Eio => OnMismatch::Eio,
        }
    }
}

const SERVE_EXAMPLE: &str = "\
Example (QEMU guest under TCG, 2 queues):
  pinblk serve --socket /tmp/pinblk.sock --image disk.img --size 1G --num-queues 2 &
  qemu-system-x86_64 -accel tcg -m 512M \\
    -object memory-backend-memfd,id=mem,size=512M,share=on \\
    -machine q35,memory-backend=mem \\
    -chardev socket,id=char0,path=/tmp/pinblk.sock \\
    -device vhost-user-blk-pci,chardev=char0,num-queues=2 ...

vhost-user needs guest memory QEMU can share (memory-backend-memfd or
memory-backend-file with share=on). Set RUST_LOG=debug for more detail.";

const CTL_EXAMPLE: &str = "\
Examples:
  pinblk ctl /run/pinblk.ctl query-stats
  pinblk ctl /run/pinblk.ctl set-policy policy=bounce bounce=always
  pinblk ctl /run/pinblk.ctl set-on-mismatch on-mismatch=eio
  pinblk ctl /run/pinblk.ctl set-injection read-delay-ms=20 probability=0.5
  pinblk ctl /run/pinblk.ctl set-injection read-delay-ms=0      # off
  pinblk ctl /run/pinblk.ctl flush-report";

/// pinblk: a vhost-user-blk backend that pins guest pages under DMA,
/// detects writes of pages still under DMA and checksums every write.
#[derive(Debug, Parser)]
#[command(name = "pinblk", version, after_help = SERVE_EXAMPLE)]
pub struct Cli {
    /// Print the backend's capabilities as JSON (QEMU docs/interop/vhost-user.json) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// No progress display (scrub, creating or recovering a checksum store).
    #[arg(long, short, global = true)]
    pub quiet: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image as a vhost-user-blk device on a Unix socket.
    #[command(after_help = SERVE_EXAMPLE)]
    Serve(Box<ServeArgs>),
    /// Summarize a report written by `serve --report`: totals by kind and
    /// action, the worst LBAs, a time line, and what each kind means.
    Report {
        /// The JSON Lines report.
        path: PathBuf,
        /// Print each event as its human line (as the log has it, without
        /// the log's rate limit) instead of the summary.
        #[arg(long)]
        human: bool,
    },
    /// Draw a report written by `serve --report` as an SVG picture: events
    /// over time per queue, the blocks with torn writes and checksum
    /// failures, and the events by policy and action.
    Plot {
        /// The JSON Lines report.
        report: PathBuf,
        /// The SVG file to write.
        #[arg(short, long, value_name = "PATH", default_value = "run.svg")]
        output: PathBuf,
    },
    /// Send one command to a running `pinblk serve --control PATH` and print
    /// its answer (JSON); exits 1 on an error reply.
    #[command(after_help = CTL_EXAMPLE)]
    Ctl {
        /// The control socket.
        socket: PathBuf,
        /// The command: query-stats, query-pins, query-config, set-policy,
        /// set-on-mismatch, set-injection, flush-report, query-commands.
        command: String,
        /// Arguments: KEY=VALUE pairs (VALUE is JSON or a plain word) or one JSON object.
        args: Vec<String>,
    },
    /// Verify a whole image against its checksum store, offline; exits 1 on any mismatch.
    Scrub {
        /// The image.
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// The checksum store (default: IMAGE.pinsum).
        #[arg(long, value_name = "PATH")]
        checksum_store: Option<PathBuf>,
    },
}

/// Arguments of `pinblk serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Unix socket to listen on (created mode 0600; an old socket file is replaced).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: PathBuf,

    /// Raw disk image or host block device to serve (a block device needs --checksum-store).
    #[arg(long, visible_alias = "blk-file", value_name = "PATH")]
    pub image: PathBuf,

    /// Create a sparse image of this size if the image does not exist (bytes; K, M, G, T suffixes are binary).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Number of request virtqueues (each gets its own worker thread and io_uring).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Largest virtqueue size accepted (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Longest a queue's worker busy-polls its ring and storage for more work
    /// before sleeping (microseconds, at most 1000; the budget adapts from 0
    /// up to this). Costs CPU while polling; 0 turns polling off. The
    /// default, 128, is 4x QEMU's default poll-max-ns: in a VM a wake-up
    /// can cost more than 32 µs.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(0..=1000), value_name = "US")]
    pub poll_max_us: u64,

    /// Offer VIRTIO_BLK_F_RO and fail every write, discard and write-zeroes with IOERR.
    #[arg(long)]
    pub read_only: bool,

    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "pinblk")]
    pub serial: String,

    /// Logical block size in bytes reported to the guest (512 or 4096;
    /// default: a block device's own, 512 for a file).
    #[arg(long, value_parser = parse_block_size)]
    pub logical_block_size: Option<u32>,

    /// Open the image with O_DIRECT (like QEMU's cache.direct=on).
    #[arg(long)]
    pub direct: bool,

    /// How READ and WRITE reach the image (QEMU's `aio=`): `io_uring`,
    /// `mmap` (a memcpy through a shared mapping, no system call), or `auto`
    /// (mmap for a fully allocated file on tmpfs or ramfs without --direct).
    #[arg(long, value_enum, default_value_t = AioArg::Auto)]
    pub aio: AioArg,

    /// What to do with a request that touches guest pages still under DMA
    /// (R1: a WRITE from pages an in-flight READ is filling; R2: a READ into
    /// pages an in-flight WRITE is sending; any WRITE of a long-term-pinned page).
    #[arg(long, value_enum, default_value_t = PolicyArg::Bounce)]
    pub policy: PolicyArg,

    /// Which writes are copied to a private buffer before they are written:
    /// `conflicts` (as the policy decides) or `always` (full stable-pages protection).
    #[arg(long, value_enum, default_value_t = BounceArg::Conflicts)]
    pub bounce: BounceArg,

    /// Longest a stalled request waits for the conflicting pins before it is bounced.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub stall_timeout: Duration,

    /// A pin held longer than this counts as long-term (FOLL_LONGTERM); writes to it always conflict.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub longterm_after: Duration,

    /// Memory for bounce buffers, all queues (bytes; K, M, G suffixes). When it
    /// is used up, a request that must be bounced waits until buffers are returned.
    #[arg(long, default_value = "64M", value_parser = parse_size, value_name = "BYTES")]
    pub bounce_pool: u64,

    /// Memory for bounce buffers of one queue (bytes; K, M, G suffixes). A
    /// request larger than this or than --bounce-pool is never bounced: it
    /// fails with IOERR.
    #[arg(long, default_value = "32M", value_parser = parse_size, value_name = "BYTES")]
    pub bounce_queue_max: u64,

    /// Largest READ or WRITE (bytes; K, M, G suffixes; below 4G): offered
    /// to the driver as size_max = this / seg_max, and a larger request fails
    /// with IOERR. At least (queue size - 2) x 4K.
    #[arg(long, default_value = "32M", value_parser = parse_transfer, value_name = "BYTES")]
    pub max_transfer: u32,

    /// Fault injection: keep READ DMAs pinned this much longer (completion held back),
    /// to provoke conflicts on purpose.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub inject_read_delay: Option<Duration>,

    /// Probability (0 to 1) that a READ gets --inject-read-delay.
    #[arg(long, default_value_t = 1.0, value_parser = parse_probability, value_name = "P")]
    pub inject_read_probability: f64,

    /// Pin tracking and conflict detection. `off` disables the pin model
    /// entirely (no pins, no conflicts, no policy): only for measuring what
    /// the tracker costs.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub pin_tracking: OnOff,

    /// Checksum every write: CRC32C per 4 KiB block of the image, verified on every READ.
    #[arg(long, value_enum, default_value_t = Checksum::Crc32c)]
    pub checksum: Checksum,

    /// Where the checksums live (default: IMAGE.pinsum beside the image).
    #[arg(long, value_name = "PATH")]
    pub checksum_store: Option<PathBuf>,

    /// With checksums on: LBA range locks across queues (overlapping requests
    /// are ordered, so checksums and data always agree) and the write-intent
    /// record (what a crash may excuse). `off` only to measure what they
    /// cost: reports can then be wrong under overlapping I/O or after a crash.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub range_tracking: OnOff,

    /// What a READ of a block that fails verification gets: `report` (data
    /// returned, event reported) or `eio` (VIRTIO_BLK_S_IOERR, as btrfs and dm-integrity do).
    #[arg(long, value_enum, default_value_t = OnMismatchArg::Report)]
    pub on_mismatch: OnMismatchArg,

    /// Append report events (JSON Lines, schema in README) to this file.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Complete READ and WRITE without touching the image (a reference that
    /// shows what the vhost-user path itself costs; data is not stored).
    #[arg(long)]
    pub null: bool,

    /// Exit after serving this many connections (default: serve until SIGINT/SIGTERM).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u64>,

    /// Control socket (mode 0600): JSON lines in the style of QMP, e.g.
    /// `{"execute":"set-policy","arguments":{"policy":"bounce"}}`; `pinblk ctl` is its client.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

impl Cli {
    /// Parses the process's arguments; on a usage error, or for `--help` and
    /// `--version`, prints clap's message and exits (2 for a usage error, 0 otherwise).
    pub fn parse_args() -> Cli {
        <Cli as Parser>::parse()
    }

    /// Prints the top-level help to stdout.
    ///
    /// # Errors
    /// The `io::Error` of writing stdout.
    pub fn print_help() -> std::io::Result<()> {
        Cli::command().print_help()
    }
}

/// `pinblk serve` arguments that do not make sense together (a usage error:
/// `pinblk` exits 2, as for the errors clap itself finds).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// `--checksum-store` names a store, but `--checksum off` disables checksums.
    #[error("--checksum-store {0} given with --checksum off: drop --checksum-store, or checksum with --checksum crc32c")]
    ChecksumStoreWithChecksumOff(PathBuf),
}

impl TryFrom<ServeArgs> for DeviceOptions {
    type Error = ArgsError;

    /// The device part of `pinblk serve` (everything but `--socket` and
    /// `--max-connections`, which the caller takes first).
    ///
    /// # Errors
    /// [`ArgsError`] for arguments that contradict each other.
    fn try_from(a: ServeArgs) -> Result<DeviceOptions, ArgsError> {
        if let (Checksum::Off, Some(p)) = (a.checksum, &a.checksum_store) {
            return Err(ArgsError::ChecksumStoreWithChecksumOff(p.clone()));
        }
        Ok(DeviceOptions {
            image: a.image,
            image_options: ImageOptions {
                create_size: a.size,
                read_only: a.read_only,
                direct: a.direct,
                logical_block_size: a.logical_block_size,
                aio: a.aio.into(),
            },
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: a.serial,
            null: a.null,
            pin_tracking: a.pin_tracking == OnOff::On,
            longterm_after: a.longterm_after,
            policy: PolicyConfig {
                policy: a.policy.into(),
                bounce_always: BounceMode::from(a.bounce) == BounceMode::Always,
                stall_timeout: a.stall_timeout,
                read_delay: a.inject_read_delay,
                read_delay_probability: a.inject_read_probability,
                bounce_pool_bytes: a.bounce_pool,
                bounce_queue_bytes: a.bounce_queue_max,
            },
            checksum: a.checksum == Checksum::Crc32c,
            checksum_store: a.checksum_store,
            range_tracking: a.range_tracking == OnOff::On,
            on_mismatch: a.on_mismatch.into(),
            report: a.report,
            max_transfer: a.max_transfer,
            poll_max: Duration::from_micros(a.poll_max_us),
        })
    }
}

/// Parses a size in bytes with an optional binary suffix (K, M, G, T).
///
/// # Errors
/// A message naming the bad value.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}: use K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// [`parse_size`] for a size below 4 GiB (a transfer: virtio lengths are 32-bit).
fn parse_transfer(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?}: a transfer must be below 4G"))
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability between 0 and 1")),
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(2..=1024).contains(&n) || !n.is_power_of_two() {
        return Err("queue size must be a power of two between 2 and 1024".into());
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("logical block size must be 512 or 4096".into()),
    }
}

/// The `--print-capabilities` answer for a block backend (vhost-user.json).
pub const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "read-only-mode",
    "blk-file"
  ]
}"#;

#[cfg(test)]
mod tests;
