//! A virtio-blk request, typed and checked against the device (virtio 1.2
//! §5.2.6): what the data path may carry out without checking anything again.
//!
//! [`parse`] splits a descriptor chain ([`super::chain::parse_chain`]), reads
//! its header, and checks everything the request says against the device's
//! [`Limits`]: read-only, logical-block alignment, capacity, DISCARD and
//! WRITE_ZEROES segments (read from guest memory). The result is a
//! [`Request`] whose [`Command`] holds only valid sector ranges, or a
//! [`Refused`] whose [`RequestError::status`] is the status byte the driver
//! gets (or none when the chain has no status byte).
//!
//! Models: firecracker `devices/virtio/block` (`Request::parse`), cloud-hypervisor
//! `block` (`ExecuteError::status()`).

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};

use super::chain::{parse_chain, ParseError, RawRequest, RequestType, SEGMENT_LEN};
use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::guest::{read_ranges, Ranges, Sector, SECTOR_SIZE};

/// What a request is checked against: the device as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes (512 or 4096): READ and WRITE offsets and
    /// lengths must be multiples of it.
    pub logical_block_size: u32,
    /// VIRTIO_BLK_F_RO: WRITE, DISCARD and WRITE_ZEROES are refused.
    pub read_only: bool,
    /// Largest READ or WRITE data buffer in bytes
    /// ([`super::config::DeviceConfig::max_transfer`]); larger ones are refused.
    pub max_transfer: u32,
}

/// One DISCARD or WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`),
/// checked: inside the capacity, at most [`MAX_DISCARD_SECTORS`], not empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector (512-byte units).
    pub sector: Sector,
    /// Length in 512-byte sectors (1..=[`MAX_DISCARD_SECTORS`]).
    pub sectors: u32,
    /// WRITE_ZEROES with VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: the range may be
    /// deallocated. Always `false` for DISCARD.
    pub unmap: bool,
}

impl Segment {
    /// Byte offset on the device.
    pub fn offset(&self) -> u64 {
        self.sector.bytes()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.sectors) * SECTOR_SIZE
    }

    /// Whether the segment covers no bytes (never true for a parsed segment).
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }
}

/// What the driver asks for, with every range checked against [`Limits`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// VIRTIO_BLK_T_IN: `len` bytes from `sector` into the data buffer.
    Read {
        /// First sector.
        sector: Sector,
    },
    /// VIRTIO_BLK_T_OUT: the data buffer to the device at `sector`.
    Write {
        /// First sector.
        sector: Sector,
    },
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial into the data buffer (at most 20 bytes).
    GetId,
    /// VIRTIO_BLK_T_DISCARD: deallocate the segments (empty segments dropped).
    Discard(Vec<Segment>),
    /// VIRTIO_BLK_T_WRITE_ZEROES: zero the segments (empty segments dropped).
    WriteZeroes(Vec<Segment>),
}

impl Command {
    /// Upper-case name used in logs ("READ", "WRITE", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "READ",
            Command::Write { .. } => "WRITE",
            Command::Flush => "FLUSH",
            Command::GetId => "GET_ID",
            Command::Discard(_) => "DISCARD",
            Command::WriteZeroes(_) => "WRITE_ZEROES",
        }
    }

    /// The first sector of a READ or WRITE.
    pub fn sector(&self) -> Option<Sector> {
        match self {
            Command::Read { sector } | Command::Write { sector } => Some(*sector),
            _ => None,
        }
    }
}

/// A checked virtio-blk request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Head index of the descriptor chain (what goes into the used element).
    pub head: u16,
    /// Guest-physical address of the 1-byte status.
    pub status_addr: GuestAddress,
    /// What to do.
    pub command: Command,
    /// The data buffer in chain order, guest-physical: READ destination,
    /// WRITE source, GET_ID answer (empty for the others: DISCARD and
    /// WRITE_ZEROES segments are already in the [`Command`]).
    pub data: Ranges,
    /// Total length of `data` in bytes.
    pub data_len: u32,
}

impl Request {
    /// The sector of a READ or WRITE, else the header's sector (0 for most).
    pub fn sector(&self) -> Sector {
        self.command.sector().unwrap_or_default()
    }
}

/// Why a request is refused; [`RequestError::status`] is what the driver gets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain itself is malformed (virtio 1.2 §2.7.4).
    #[error("malformed descriptor chain: {0}")]
    Chain(#[from] ParseError),
    /// The chain's data adds up to 4 GiB or more (virtio 1.2 §2.7.5.2 forbids it).
    #[error("data buffer of {0} bytes is 4 GiB or more")]
    TooLong(u64),
    /// A READ or WRITE larger than the device's largest transfer (more than
    /// the config space lets a driver send: `seg_max` × `size_max`).
    #[error("data buffer of {len} bytes is over the largest transfer of {max} bytes")]
    OverMaxTransfer {
        /// Length in bytes.
        len: u64,
        /// The largest transfer in bytes ([`Limits::max_transfer`]).
        max: u32,
    },
    /// A WRITE, DISCARD or WRITE_ZEROES on a read-only device.
    #[error("{0} on a read-only device")]
    ReadOnly(&'static str),
    /// A READ or WRITE length that is not a multiple of the logical block.
    #[error("length {len} is not a multiple of the {block}-byte logical block")]
    UnalignedLength {
        /// Length in bytes.
        len: u64,
        /// Logical block size in bytes.
        block: u32,
    },
    /// A READ or WRITE that does not start on a logical block.
    #[error("sector {sector} is not aligned to the {block}-byte logical block")]
    UnalignedSector {
        /// First sector.
        sector: u64,
        /// Logical block size in bytes.
        block: u32,
    },
    /// A range that ends past the capacity (or overflows).
    #[error("sectors {sector}+{sectors} are past capacity ({capacity} sectors)")]
    PastCapacity {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// A DISCARD / WRITE_ZEROES payload that is not 1..=MAX_DISCARD_SEG segments.
    #[error("{0} bytes of segments: not 1..={MAX_DISCARD_SEG} segments of {SEGMENT_LEN} bytes")]
    BadSegmentList(u64),
    /// The segments cannot be read from guest memory.
    #[error("cannot read segments from guest memory")]
    SegmentsUnreadable,
    /// A segment longer than [`MAX_DISCARD_SECTORS`].
    #[error("segment of {0} sectors exceeds {MAX_DISCARD_SECTORS}")]
    SegmentTooLong(u32),
    /// Segment flags the device does not support (unknown bits, or UNMAP on a DISCARD).
    #[error("segment flags {0:#x} not supported")]
    SegmentFlags(u32),
    /// A request type the device does not know.
    #[error("unknown request type {0}")]
    UnknownType(u32),
}

impl RequestError {
    /// The virtio-blk status byte for this refusal: VIRTIO_BLK_S_UNSUPP for a
    /// request type or flag the device does not support, VIRTIO_BLK_S_IOERR
    /// for everything else (virtio 1.2 §5.2.6.1).
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnknownType(_) | RequestError::SegmentFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused request: where its status byte is, if anywhere, and why.
#[derive(Debug)]
pub struct Refused {
    /// Head index of the descriptor chain.
    pub head: u16,
    /// Guest-physical address of the status byte; `None` when the chain has
    /// none (it is completed with used length 0 and no status).
    pub status_addr: Option<GuestAddress>,
    /// The request type, when the header could be read (for logs).
    pub kind: Option<RequestType>,
    /// First sector from the header (for logs; 0 when unknown).
    pub sector: u64,
    /// Length of the data buffer in bytes (for logs; 0 when unknown).
    pub data_len: u64,
    /// Why.
    pub error: RequestError,
}

/// Parses and checks one descriptor chain.
///
/// # Errors
/// [`Refused`] for a malformed chain or a request the device refuses, with
/// the status the driver must get ([`RequestError::status`]).
pub fn parse<M>(chain: DescriptorChain<M>, limits: &Limits) -> Result<Request, Refused>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let raw = parse_chain(&chain).map_err(|bad| Refused {
        head: bad.head,
        status_addr: bad.status_addr,
        kind: None,
        sector: 0,
        data_len: 0,
        error: RequestError::Chain(bad.error),
    })?;
    let refuse = |raw: &RawRequest, error| Refused {
        head: raw.head,
        status_addr: Some(raw.status_addr),
        kind: Some(raw.kind),
        sector: raw.sector,
        data_len: raw.data_len,
        error,
    };
    match check(chain.memory(), &raw, limits) {
        Ok(command) => {
            let data = match command {
                Command::Discard(_) | Command::WriteZeroes(_) | Command::Flush => Ranges::new(),
                _ => raw.data,
            };
            let data_len: u64 = data.iter().map(|r| u64::from(r.len)).sum();
            // `check` refused 4 GiB or more.
            let data_len = u32::try_from(data_len).expect("checked against u32::MAX");
            Ok(Request {
                head: raw.head,
                status_addr: raw.status_addr,
                command,
                data,
                data_len,
            })
        }
        Err(e) => Err(refuse(&raw, e)),
    }
}

/// The checks of [`parse`] on a split chain.
fn check<M: GuestMemory + ?Sized>(
    mem: &M,
    raw: &RawRequest,
    limits: &Limits,
) -> Result<Command, RequestError> {
    if raw.data_len > u64::from(u32::MAX) {
        return Err(RequestError::TooLong(raw.data_len));
    }
    let writes = matches!(
        raw.kind,
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
    );
    if writes && limits.read_only {
        return Err(RequestError::ReadOnly(raw.kind.name()));
    }
    match raw.kind {
        RequestType::In | RequestType::Out => {
            let sector = check_transfer(raw, limits)?;
            Ok(if raw.kind == RequestType::In {
                Command::Read { sector }
            } else {
                Command::Write { sector }
            })
        }
        RequestType::Flush => Ok(Command::Flush),
        RequestType::GetId => Ok(Command::GetId),
        RequestType::Discard => Ok(Command::Discard(segments(mem, raw, limits)?)),
        RequestType::WriteZeroes => Ok(Command::WriteZeroes(segments(mem, raw, limits)?)),
        RequestType::Unsupported(t) => Err(RequestError::UnknownType(t)),
    }
}

/// Checks a READ's or WRITE's range: logical-block aligned, inside the capacity.
fn check_transfer(raw: &RawRequest, limits: &Limits) -> Result<Sector, RequestError> {
    let block = limits.logical_block_size;
    let lbs = u64::from(block);
    let len = raw.data_len;
    if len > u64::from(limits.max_transfer) {
        return Err(RequestError::OverMaxTransfer {
            len,
            max: limits.max_transfer,
        });
    }
    if !len.is_multiple_of(lbs) {
        return Err(RequestError::UnalignedLength { len, block });
    }
    if !raw.sector.wrapping_mul(SECTOR_SIZE).is_multiple_of(lbs) {
        return Err(RequestError::UnalignedSector {
            sector: raw.sector,
            block,
        });
    }
    check_range(raw.sector, len / SECTOR_SIZE, limits)?;
    Ok(Sector(raw.sector))
}

fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<(), RequestError> {
    let end = sector.checked_add(sectors);
    if end.is_none_or(|e| e > limits.capacity) {
        return Err(RequestError::PastCapacity {
            sector,
            sectors,
            capacity: limits.capacity,
        });
    }
    Ok(())
}

/// Reads and checks the segments of a DISCARD or WRITE_ZEROES (virtio 1.2
/// §5.2.6: `struct virtio_blk_discard_write_zeroes`, 16 bytes each).
fn segments<M: GuestMemory + ?Sized>(
    mem: &M,
    raw: &RawRequest,
    limits: &Limits,
) -> Result<Vec<Segment>, RequestError> {
    let len = raw.data_len;
    let n = len / SEGMENT_LEN as u64;
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) || n > u64::from(MAX_DISCARD_SEG) {
        return Err(RequestError::BadSegmentList(len));
    }
    let mut buf = vec![0u8; len as usize];
    read_ranges(mem, &raw.data, 0, &mut buf).map_err(|_| RequestError::SegmentsUnreadable)?;
    let discard = raw.kind == RequestType::Discard;
    let mut out = Vec::with_capacity(n as usize);
    for s in buf.chunks_exact(SEGMENT_LEN) {
        let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let sector = le64(&s[0..8]);
        let sectors = le32(&s[8..12]);
        let flags = le32(&s[12..16]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && discard) {
            return Err(RequestError::SegmentFlags(flags));
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::SegmentTooLong(sectors));
        }
        check_range(sector, u64::from(sectors), limits)?;
        if sectors > 0 {
            out.push(Segment {
                sector: Sector(sector),
                sectors,
                unmap,
            });
        }
    }
    Ok(out)
}
