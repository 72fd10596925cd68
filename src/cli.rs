//! Command line of the `pinblk` binary (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::integrity::OnMismatch;
use crate::pin::policy::{BounceMode, Policy};

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

/// pinblk: a vhost-user-blk backend that pins guest pages under DMA,
/// detects writes of pages still under DMA and checksums every write.
#[derive(Debug, Parser)]
#[command(name = "pinblk", version, after_help = SERVE_EXAMPLE)]
pub struct Cli {
    /// Print the backend's capabilities as JSON (QEMU docs/interop/vhost-user.json) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image as a vhost-user-blk device on a Unix socket.
    #[command(after_help = SERVE_EXAMPLE)]
    Serve(ServeArgs),
    /// Summarize a report written by `serve --report`: totals by kind and
    /// action, the worst LBAs, a time line, and what each kind means.
    Report {
        /// The JSON Lines report.
        path: PathBuf,
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

    /// Raw disk image to serve.
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

    /// Offer VIRTIO_BLK_F_RO and fail every write, discard and write-zeroes with IOERR.
    #[arg(long)]
    pub read_only: bool,

    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "pinblk")]
    pub serial: String,

    /// Logical block size in bytes reported to the guest.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Open the image with O_DIRECT (like QEMU's cache.direct=on).
    #[arg(long)]
    pub direct: bool,

    /// What to do with a request that touches guest pages still under DMA
    /// (R1: a WRITE from pages an in-flight READ is filling; R2: a READ into
    /// pages an in-flight WRITE is sending; any WRITE of a long-term-pinned page).
    #[arg(long, value_enum, default_value_t = Policy::Bounce)]
    pub policy: Policy,

    /// Which writes are copied to a private buffer before they are written:
    /// `conflicts` (as the policy decides) or `always` (full stable-pages protection).
    #[arg(long, value_enum, default_value_t = BounceMode::Conflicts)]
    pub bounce: BounceMode,

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

    /// What a READ of a block that fails verification gets: `report` (data
    /// returned, event reported) or `eio` (VIRTIO_BLK_S_IOERR, as btrfs and dm-integrity do).
    #[arg(long, value_enum, default_value_t = OnMismatch::Report)]
    pub on_mismatch: OnMismatch,

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
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("abc").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
