//! Descriptor-chain parsing for virtio-blk requests (virtio 1.2 §5.2.6).
//!
//! A request is read framing-agnostically, as virtio 1.2 §2.7.4 asks: the
//! device-readable descriptors are concatenated into one byte stream (the
//! 16-byte `virtio_blk_outhdr`, then for WRITE the data, for DISCARD and
//! WRITE_ZEROES the segments), and the device-writable descriptors into
//! another (for READ the data, for GET_ID the 20-byte id, and always the
//! 1-byte status last). Every buffer is kept as a list of guest-physical
//! ranges ([`GuestRange`]) so that the pin model sees it before it becomes
//! host iovecs.

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;

#[cfg(test)]
use crate::guest::write_ranges;
use crate::guest::{read_ranges, take_ranges, GuestRange};
use vm_memory::{GuestAddress, GuestMemory};

/// Size in bytes of `struct virtio_blk_outhdr` (type, reserved/ioprio, sector).
pub const OUTHDR_LEN: usize = 16;
/// Size in bytes of one `struct virtio_blk_discard_write_zeroes` segment.
pub const SEGMENT_LEN: usize = 16;
/// Size in bytes of the GET_ID answer (virtio 1.2 §5.2.6: 20 bytes, not NUL-terminated if full).
pub const ID_LEN: usize = 20;
/// Upper bound on descriptors in one chain we accept (the iovec limit, `IOV_MAX`).
pub const MAX_SEGMENTS: usize = 1024;

/// The request types of virtio 1.2 §5.2.6 that pinblk knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read from the disk into guest memory.
    In,
    /// VIRTIO_BLK_T_OUT: write guest memory to the disk.
    Out,
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable (fdatasync).
    Flush,
    /// VIRTIO_BLK_T_GET_ID: return the 20-byte serial.
    GetId,
    /// VIRTIO_BLK_T_DISCARD: deallocate sector ranges (punch holes).
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES: zero sector ranges, unmapping them if allowed.
    WriteZeroes,
    /// Any other type: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl RequestType {
    /// Maps the `type` field of `virtio_blk_outhdr`.
    pub fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// Short upper-case name used in logs and reports ("READ", "WRITE", ...).
    pub fn name(&self) -> &'static str {
        match self {
            RequestType::In => "READ",
            RequestType::Out => "WRITE",
            RequestType::Flush => "FLUSH",
            RequestType::GetId => "GET_ID",
            RequestType::Discard => "DISCARD",
            RequestType::WriteZeroes => "WRITE_ZEROES",
            RequestType::Unsupported(_) => "UNSUPPORTED",
        }
    }
}

/// A descriptor chain split into a virtio-blk request's parts: header fields
/// plus its buffers as guest-physical ranges, not yet checked against the
/// device (see [`crate::virtio_blk::request::parse`] for the typed request).
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// Head index of the descriptor chain (what goes into the used element).
    pub head: u16,
    /// Request type from the header.
    pub kind: RequestType,
    /// Starting sector from the header, in 512-byte units.
    pub sector: u64,
    /// Data buffer in chain order: device-readable bytes after the header for
    /// WRITE, DISCARD and WRITE_ZEROES; device-writable bytes before the status
    /// byte for READ and GET_ID.
    pub data: Vec<GuestRange>,
    /// Total length of `data` in bytes (a chain may add up to more than
    /// 4 GiB; [`crate::virtio_blk::request::parse`] refuses that).
    pub data_len: u64,
    /// Guest-physical address of the 1-byte status.
    pub status_addr: GuestAddress,
}

/// Why a descriptor chain is not a valid virtio-blk request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// No device-writable byte to hold the status: nothing can be reported to the driver.
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes before the writable part.
    #[error("request header is {0} bytes, shorter than the 16-byte virtio_blk_outhdr")]
    ShortHeader(usize),
    /// A device-readable descriptor after a device-writable one (virtio 1.2 §2.7.4.2).
    #[error("device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress {
        /// Guest-physical address of the descriptor.
        addr: u64,
        /// Length of the descriptor in bytes.
        len: u32,
    },
    /// Data in descriptors of the wrong direction, e.g. device-readable data on a READ.
    #[error("{kind} request has {bytes} data bytes in descriptors of the wrong direction")]
    WrongDirection {
        /// Request type name.
        kind: &'static str,
        /// Bytes in the wrongly directed descriptors.
        bytes: u64,
    },
    /// More descriptors than [`MAX_SEGMENTS`].
    #[error("descriptor chain has more than {MAX_SEGMENTS} descriptors")]
    TooManyDescriptors,
}

/// Buffers of a chain that failed to parse but whose status byte is known, so
/// the driver can be told VIRTIO_BLK_S_IOERR.
#[derive(Debug)]
pub struct BadRequest {
    /// Head index of the descriptor chain.
    pub head: u16,
    /// Guest-physical address of the status byte, if one was found.
    pub status_addr: Option<GuestAddress>,
    /// What is wrong with the chain.
    pub error: ParseError,
}

/// Splits one descriptor chain into a [`RawRequest`].
///
/// Checks only what the chain itself says (framing, addresses inside guest
/// memory, header length); checks against the device (capacity, read-only,
/// lengths) are made by the caller, which knows the device.
///
/// # Errors
/// A [`BadRequest`] naming the head index, the status byte if one was found,
/// and the [`ParseError`].
pub fn parse_chain<M>(chain: &DescriptorChain<M>) -> Result<RawRequest, BadRequest>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    let mut readable: Vec<GuestRange> = Vec::new();
    let mut writable: Vec<GuestRange> = Vec::new();
    let mut error = None;
    let mut count = 0usize;
    for desc in chain.clone() {
        count += 1;
        if count > MAX_SEGMENTS {
            error.get_or_insert(ParseError::TooManyDescriptors);
            break;
        }
        let range = GuestRange {
            addr: desc.addr().0,
            len: desc.len(),
        };
        if range.len == 0 {
            continue;
        }
        if !mem.check_range(
            desc.addr(),
            desc.len() as usize,
            vm_memory::Permissions::ReadWrite,
        ) {
            error.get_or_insert(ParseError::BadAddress {
                addr: range.addr,
                len: range.len,
            });
        }
        if desc.is_write_only() {
            writable.push(range);
        } else {
            if !writable.is_empty() {
                error.get_or_insert(ParseError::ReadableAfterWritable);
            }
            readable.push(range);
        }
    }

    // The status byte is the last byte of the device-writable part.
    let status_addr = match writable.last_mut() {
        Some(last) if error != Some(ParseError::ReadableAfterWritable) => {
            let addr = GuestAddress(last.addr.saturating_add(u64::from(last.len) - 1));
            last.len -= 1;
            if last.len == 0 {
                writable.pop();
            }
            let status_ok = mem.check_range(addr, 1, vm_memory::Permissions::ReadWrite);
            status_ok.then_some(addr)
        }
        _ => None,
    };
    let Some(status_addr) = status_addr else {
        return Err(BadRequest {
            head,
            status_addr: None,
            error: error.unwrap_or(ParseError::NoStatus),
        });
    };
    if let Some(error) = error {
        return Err(BadRequest {
            head,
            status_addr: Some(status_addr),
            error,
        });
    }

    let readable_len: u64 = readable.iter().map(|r| u64::from(r.len)).sum();
    if readable_len < OUTHDR_LEN as u64 {
        return Err(BadRequest {
            head,
            status_addr: Some(status_addr),
            error: ParseError::ShortHeader(readable_len as usize),
        });
    }
    let mut hdr = [0u8; OUTHDR_LEN];
    if read_ranges(mem, &readable, 0, &mut hdr).is_err() {
        let r = readable[0];
        return Err(BadRequest {
            head,
            status_addr: Some(status_addr),
            error: ParseError::BadAddress {
                addr: r.addr,
                len: r.len,
            },
        });
    }
    let kind = RequestType::from_raw(u32::from_le_bytes(hdr[0..4].try_into().unwrap()));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());

    // Data: device-readable bytes after the header, and all device-writable
    // bytes before the status. A request type uses one or the other; the
    // caller rejects the wrong direction (`WrongDirection`).
    let readable_data = take_ranges(
        &readable,
        OUTHDR_LEN as u64,
        readable_len - OUTHDR_LEN as u64,
    );
    let (data, other) = match kind {
        RequestType::In | RequestType::GetId => (writable, readable_data),
        _ => (readable_data, writable),
    };
    let data_len: u64 = data.iter().map(|r| u64::from(r.len)).sum();
    let other_len: u64 = other.iter().map(|r| u64::from(r.len)).sum();
    let req = RawRequest {
        head,
        kind,
        sector,
        data_len,
        data,
        status_addr,
    };
    if other_len != 0 && !matches!(kind, RequestType::Unsupported(_)) {
        return Err(BadRequest {
            head,
            status_addr: Some(status_addr),
            error: ParseError::WrongDirection {
                kind: kind.name(),
                bytes: other_len,
            },
        });
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::test_util::{
        guest_mmap as mem, indirect_table, outhdr, r, raw, w, D, MEM_SIZE,
    };
    use crate::worker::GuestMem as Mem;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const TABLE: u64 = 0x4_0000;

    /// Writes a `virtio_blk_outhdr` at `addr`.
    fn hdr(mem: &Mem, addr: u64, kind: u32, sector: u64) {
        mem.write_slice(&outhdr(kind, sector), GuestAddress(addr))
            .unwrap();
    }

    /// Parses the chain made of `descs` (direct descriptors, head at index 0).
    fn parse(mem: &Mem, descs: &[D]) -> Result<RawRequest, BadRequest> {
        let q = MockSplitQueue::new(mem, 16);
        let raws: Vec<RawDescriptor> = descs.iter().map(|&d| raw(d, 0, 0)).collect();
        let chain = q.build_desc_chain(&raws).unwrap();
        assert_eq!(chain.head_index(), 0);
        parse_chain(&chain)
    }

    /// Parses a chain whose only direct descriptor points at an indirect table
    /// (at `TABLE`) holding `descs`.
    fn parse_indirect(mem: &Mem, descs: &[D]) -> Result<RawRequest, BadRequest> {
        let table = indirect_table(mem, TABLE, descs);
        let q = MockSplitQueue::new(mem, 16);
        parse_chain(&q.build_desc_chain(&[table]).unwrap())
    }

    fn ranges(v: &[(u64, u32)]) -> Vec<GuestRange> {
        v.iter()
            .map(|&(addr, len)| GuestRange { addr, len })
            .collect()
    }

    fn bad(res: Result<RawRequest, BadRequest>) -> BadRequest {
        match res {
            Ok(req) => panic!("parsed, expected an error: {req:?}"),
            Err(b) => b,
        }
    }

    #[test]
    fn read_request() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_IN, 42);
        let req = parse(&m, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]).unwrap();
        assert_eq!(req.head, 0);
        assert_eq!(req.kind, RequestType::In);
        assert_eq!(req.sector, 42);
        assert_eq!(req.data, ranges(&[(DATA, 4096)]));
        assert_eq!(req.data_len, 4096);
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn write_request_with_several_data_descriptors() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_OUT, 7);
        let req = parse(
            &m,
            &[
                r(HDR, 16),
                r(DATA, 1000),
                r(DATA + 0x2000, 24),
                w(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(req.kind, RequestType::Out);
        assert_eq!(req.sector, 7);
        assert_eq!(req.data, ranges(&[(DATA, 1000), (DATA + 0x2000, 24)]));
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn header_and_data_share_a_descriptor() {
        // One readable descriptor holds the header and the WRITE data.
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_OUT, 3);
        let req = parse(&m, &[r(HDR, 16 + 512), w(STATUS, 1)]).unwrap();
        assert_eq!(req.kind, RequestType::Out);
        assert_eq!(req.sector, 3);
        assert_eq!(req.data, ranges(&[(HDR + 16, 512)]));
        assert_eq!(req.data_len, 512);
    }

    #[test]
    fn header_split_over_two_descriptors_and_status_in_data_descriptor() {
        // Header bytes 0..5 at one address, 5..16 at another; READ data and
        // status in a single writable descriptor.
        let m = mem();
        let h = outhdr(VIRTIO_BLK_T_IN, 0x1234_5678_9abc);
        m.write_slice(&h[..5], GuestAddress(HDR)).unwrap();
        m.write_slice(&h[5..], GuestAddress(HDR + 0x100)).unwrap();
        let req = parse(&m, &[r(HDR, 5), r(HDR + 0x100, 11), w(DATA, 1024 + 1)]).unwrap();
        assert_eq!(req.kind, RequestType::In);
        assert_eq!(req.sector, 0x1234_5678_9abc);
        assert_eq!(req.data, ranges(&[(DATA, 1024)]));
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status_addr, GuestAddress(DATA + 1024));
    }

    #[test]
    fn header_split_inside_sector_field_with_data_following() {
        // WRITE: header split in the middle of the sector field, the second
        // descriptor also carries the first data bytes.
        let m = mem();
        let h = outhdr(VIRTIO_BLK_T_OUT, 99);
        m.write_slice(&h[..12], GuestAddress(HDR)).unwrap();
        m.write_slice(&h[12..], GuestAddress(DATA)).unwrap();
        let req = parse(
            &m,
            &[
                r(HDR, 12),
                r(DATA, 4 + 100),
                r(DATA + 0x1000, 412),
                w(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(req.kind, RequestType::Out);
        assert_eq!(req.sector, 99);
        assert_eq!(req.data, ranges(&[(DATA + 4, 100), (DATA + 0x1000, 412)]));
        assert_eq!(req.data_len, 512);
    }

    #[test]
    fn zero_length_descriptors_are_ignored() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_IN, 1);
        let req = parse(
            &m,
            &[
                r(HDR, 16),
                r(DATA, 0),
                w(DATA, 512),
                w(STATUS, 1),
                w(STATUS, 0),
            ],
        )
        .unwrap();
        assert_eq!(req.data, ranges(&[(DATA, 512)]));
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn indirect_chain() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_IN, 8);
        let req = parse_indirect(
            &m,
            &[
                r(HDR, 16),
                w(DATA, 512),
                w(DATA + 0x1000, 512),
                w(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(req.head, 0);
        assert_eq!(req.kind, RequestType::In);
        assert_eq!(req.sector, 8);
        assert_eq!(req.data, ranges(&[(DATA, 512), (DATA + 0x1000, 512)]));
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn flush_request() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse(&m, &[r(HDR, 16), w(STATUS, 1)]).unwrap();
        assert_eq!(req.kind, RequestType::Flush);
        assert!(req.data.is_empty());
        assert_eq!(req.data_len, 0);
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn get_id_request() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse(&m, &[r(HDR, 16), w(DATA, ID_LEN as u32), w(STATUS, 1)]).unwrap();
        assert_eq!(req.kind, RequestType::GetId);
        assert_eq!(req.data, ranges(&[(DATA, ID_LEN as u32)]));
        assert_eq!(req.data_len, ID_LEN as u64);
    }

    #[test]
    fn discard_and_write_zeroes_requests() {
        let m = mem();
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            hdr(&m, HDR, kind, 0);
            let req = parse(
                &m,
                &[r(HDR, 16), r(DATA, 2 * SEGMENT_LEN as u32), w(STATUS, 1)],
            )
            .unwrap();
            assert_eq!(req.kind, RequestType::from_raw(kind));
            assert_eq!(req.data, ranges(&[(DATA, 2 * SEGMENT_LEN as u32)]));
            assert_eq!(req.data_len, 32);
        }
    }

    #[test]
    fn unknown_type_parses_as_unsupported() {
        let m = mem();
        hdr(&m, HDR, 0x99, 0);
        let req = parse(
            &m,
            &[r(HDR, 16), r(DATA, 16), w(DATA + 0x100, 16), w(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(req.kind, RequestType::Unsupported(0x99));
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn no_writable_descriptor_is_no_status() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let b = bad(parse(&m, &[r(HDR, 16), r(DATA, 512)]));
        assert_eq!(b.error, ParseError::NoStatus);
        assert_eq!(b.status_addr, None);
        assert_eq!(b.head, 0);
        // Only zero-length writable descriptors: still no status byte.
        let b = bad(parse(&m, &[r(HDR, 16), w(STATUS, 0)]));
        assert_eq!(b.error, ParseError::NoStatus);
        assert_eq!(b.status_addr, None);
    }

    #[test]
    fn short_header() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let b = bad(parse(&m, &[r(HDR, 15), w(DATA, 512), w(STATUS, 1)]));
        assert_eq!(b.error, ParseError::ShortHeader(15));
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // Split over two descriptors, 8 + 7 bytes.
        let b = bad(parse(&m, &[r(HDR, 8), r(HDR + 8, 7), w(STATUS, 1)]));
        assert_eq!(b.error, ParseError::ShortHeader(15));
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // No readable descriptor at all.
        let b = bad(parse(&m, &[w(STATUS, 1)]));
        assert_eq!(b.error, ParseError::ShortHeader(0));
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn readable_after_writable() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let b = bad(parse(&m, &[r(HDR, 16), w(STATUS, 1), r(DATA, 512)]));
        assert_eq!(b.error, ParseError::ReadableAfterWritable);
        // The parser does not trust a status byte in a misframed chain.
        assert_eq!(b.status_addr, None);
        let b = bad(parse(
            &m,
            &[
                r(HDR, 16),
                w(DATA, 512),
                r(DATA + 0x1000, 512),
                w(STATUS, 1),
            ],
        ));
        assert_eq!(b.error, ParseError::ReadableAfterWritable);
    }

    #[test]
    fn wrong_direction_data() {
        let m = mem();
        // READ with device-readable data after the header.
        hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let b = bad(parse(&m, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]));
        assert_eq!(
            b.error,
            ParseError::WrongDirection {
                kind: "READ",
                bytes: 512
            }
        );
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // READ with data both ways.
        let b = bad(parse(&m, &[r(HDR, 16 + 512), w(DATA, 512), w(STATUS, 1)]));
        assert!(matches!(
            b.error,
            ParseError::WrongDirection { bytes: 512, .. }
        ));
        // WRITE with device-writable data before the status.
        hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let b = bad(parse(&m, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]));
        assert_eq!(
            b.error,
            ParseError::WrongDirection {
                kind: "WRITE",
                bytes: 512
            }
        );
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // WRITE whose status descriptor is longer than one byte.
        let b = bad(parse(&m, &[r(HDR, 16), r(DATA, 512), w(STATUS, 4)]));
        assert!(matches!(
            b.error,
            ParseError::WrongDirection { bytes: 3, .. }
        ));
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS + 3)));
        // GET_ID with readable data; DISCARD with writable segments.
        hdr(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let b = bad(parse(&m, &[r(HDR, 32), w(DATA, 20), w(STATUS, 1)]));
        assert!(matches!(
            b.error,
            ParseError::WrongDirection { kind: "GET_ID", .. }
        ));
        hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        let b = bad(parse(&m, &[r(HDR, 16), w(DATA, 16), w(STATUS, 1)]));
        assert!(matches!(
            b.error,
            ParseError::WrongDirection {
                kind: "DISCARD",
                ..
            }
        ));
    }

    #[test]
    fn address_outside_guest_memory() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
        // Data descriptor entirely outside.
        let b = bad(parse(&m, &[r(HDR, 16), w(MEM_SIZE, 512), w(STATUS, 1)]));
        assert_eq!(
            b.error,
            ParseError::BadAddress {
                addr: MEM_SIZE,
                len: 512
            }
        );
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // Data descriptor straddling the end of guest memory.
        let b = bad(parse(
            &m,
            &[r(HDR, 16), w(MEM_SIZE - 256, 512), w(STATUS, 1)],
        ));
        assert_eq!(
            b.error,
            ParseError::BadAddress {
                addr: MEM_SIZE - 256,
                len: 512
            }
        );
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // Far away (address overflow territory).
        let b = bad(parse(
            &m,
            &[r(HDR, 16), w(u64::MAX - 10, 512), w(STATUS, 1)],
        ));
        assert!(matches!(b.error, ParseError::BadAddress { .. }));
        // Header outside guest memory.
        let b = bad(parse(
            &m,
            &[r(MEM_SIZE + 0x1000, 16), w(DATA, 512), w(STATUS, 1)],
        ));
        assert_eq!(
            b.error,
            ParseError::BadAddress {
                addr: MEM_SIZE + 0x1000,
                len: 16
            }
        );
        assert_eq!(b.status_addr, Some(GuestAddress(STATUS)));
        // Status outside guest memory: nowhere to report.
        let b = bad(parse(&m, &[r(HDR, 16), w(DATA, 512), w(MEM_SIZE, 1)]));
        assert!(matches!(b.error, ParseError::BadAddress { .. }));
        assert_eq!(b.status_addr, None);
        // Status descriptor at the very top of the address space: its end
        // does not fit in a u64; still just a bad address, never a panic.
        for (addr, len) in [(u64::MAX, 1), (u64::MAX - 1, 4), (u64::MAX - 0xfff, 0x1000)] {
            let b = bad(parse(&m, &[r(HDR, 16), w(addr, len)]));
            assert_eq!(b.error, ParseError::BadAddress { addr, len });
            assert_eq!(b.status_addr, None);
        }
    }

    #[test]
    fn too_many_descriptors() {
        let m = mem();
        hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![r(HDR, 16)];
        descs.extend((0..MAX_SEGMENTS).map(|i| r(DATA + 512 * i as u64, 512)));
        descs.push(w(STATUS, 1));
        let b = bad(parse_indirect(&m, &descs));
        assert_eq!(b.error, ParseError::TooManyDescriptors);
    }

    #[test]
    fn range_helpers_cross_descriptors() {
        let m = mem();
        let rs = ranges(&[(DATA, 3), (DATA + 0x100, 5), (DATA + 0x200, 8)]);
        let src: Vec<u8> = (1..=16).collect();
        write_ranges(&m, &rs, 0, &src).unwrap();
        let mut back = [0u8; 10];
        read_ranges(&m, &rs, 2, &mut back).unwrap();
        assert_eq!(&back[..], &src[2..12]);
        let mut one = [0u8; 1];
        m.read_slice(&mut one, GuestAddress(DATA + 0x100)).unwrap();
        assert_eq!(one[0], 4);
    }
}
