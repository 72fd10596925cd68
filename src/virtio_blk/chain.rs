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
use crate::guest::{range_in_memory, read_ranges, take_ranges, GuestRange, Ranges};
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
    pub data: Ranges,
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
    /// The chain breaks off on a descriptor that still has
    /// VIRTQ_DESC_F_NEXT: its next descriptor would take the chain to 2^32
    /// bytes or more (virtio 1.2 §2.7.5.2), or it loops, or points outside
    /// the descriptor table. Its end, and so its status byte, is unknown.
    #[error(
        "descriptor chain breaks off after {descriptors} descriptors ({bytes} bytes) with \
         VIRTQ_DESC_F_NEXT set: 2^32 bytes or more in total, a loop, or a bad next index"
    )]
    Unterminated {
        /// Descriptors seen.
        descriptors: usize,
        /// Their total length in bytes.
        bytes: u64,
    },
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
    let mut readable = Ranges::new();
    let mut writable = Ranges::new();
    let mut error = None;
    // The whole chain is walked, also past MAX_SEGMENTS (virtio-queue bounds
    // it by the table size), to find where it really ends: the status byte
    // is the last byte of the device-writable part of the *whole* chain.
    let mut count = 0usize;
    // Non-empty descriptors: the ones that become iovecs (MAX_SEGMENTS).
    let mut segments = 0usize;
    // Whether the last writable range is the last one kept in `writable`
    // (not when it came past MAX_SEGMENTS).
    let mut last_kept = false;
    let mut bytes = 0u64;
    let mut ended = false;
    let mut last_writable: Option<GuestRange> = None;
    let mut misframed = false;
    for desc in chain.clone() {
        count += 1;
        bytes += u64::from(desc.len());
        ended = !desc.has_next();
        let range = GuestRange {
            addr: desc.addr().0,
            len: desc.len(),
        };
        if range.len == 0 {
            continue;
        }
        segments += 1;
        if desc.is_write_only() {
            last_writable = Some(range);
            last_kept = false;
        } else if last_writable.is_some() {
            misframed = true;
            error.get_or_insert(ParseError::ReadableAfterWritable);
        }
        if segments > MAX_SEGMENTS {
            error.get_or_insert(ParseError::TooManyDescriptors);
            continue;
        }
        if !range_in_memory(mem, desc.addr(), desc.len() as usize) {
            error.get_or_insert(ParseError::BadAddress {
                addr: range.addr,
                len: range.len,
            });
        }
        if desc.is_write_only() {
            writable.push(range);
            last_kept = true;
        } else {
            readable.push(range);
        }
    }
    if count > 0 && !ended {
        // virtio-queue stopped before a descriptor without NEXT: the next
        // one would take the chain to 2^32 bytes (virtio 1.2 §2.7.5.2), or
        // loops, or lies outside the table. The real last descriptor, the
        // one holding the status byte, was never seen: writing a status at
        // the last byte seen would land in the driver's data.
        return Err(BadRequest {
            head,
            status_addr: None,
            error: ParseError::Unterminated {
                descriptors: count,
                bytes,
            },
        });
    }

    // The status byte is the last byte of the device-writable part (virtio
    // 1.2 §5.2.6 with §2.7.4: whatever the framing). Not when a readable
    // descriptor follows a writable one: then the chain has no
    // device-writable tail, and no byte is known to be the status.
    let status_addr = match last_writable {
        Some(last) if !misframed => {
            let addr = GuestAddress(last.addr.saturating_add(u64::from(last.len) - 1));
            if last_kept {
                let tail = writable
                    .last_mut()
                    .expect("the last writable range was kept");
                tail.len -= 1;
                if tail.len == 0 {
                    writable.pop();
                }
            }
            let status_ok = range_in_memory(mem, addr, 1);
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
#[path = "chain_tests.rs"]
mod tests;
