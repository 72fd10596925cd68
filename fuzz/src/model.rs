//! An independent model of what pinblk must make of a descriptor chain,
//! written from the specification rather than from the parser:
//!
//! - virtio 1.2 §2.7.5: a chain ends at a descriptor without
//!   VIRTQ_DESC_F_NEXT; §2.7.5.2: a chain is shorter than 2^32 bytes.
//! - virtio 1.2 §2.7.4: device-readable descriptors come before
//!   device-writable ones; a request is framed by the concatenation of its
//!   buffers, not by descriptor boundaries.
//! - virtio 1.2 §5.2.6: a 16-byte `virtio_blk_outhdr` (type, ioprio,
//!   sector) first, the data, and the 1-byte status as the last
//!   device-writable byte of the whole chain; READ and GET_ID data is
//!   device-writable, WRITE, DISCARD and WRITE_ZEROES data device-readable,
//!   FLUSH has none.
//! - §5.2.6.1 and pinblk's device (README "Device"): READ/WRITE lengths at
//!   most the largest transfer (`size_max` × `seg_max` offered), lengths and
//!   offsets in logical blocks and inside the capacity; DISCARD and
//!   WRITE_ZEROES take 1..=`MAX_DISCARD_SEG` 16-byte segments of at most
//!   `MAX_DISCARD_SECTORS` sectors each, inside the capacity, with no flag
//!   but UNMAP (and UNMAP only on WRITE_ZEROES); zero-length segments are
//!   dropped; a read-only device refuses every request that writes.
//!
//! Where the specification leaves pinblk a choice, the model follows
//! pinblk's documented one: zero-length descriptors are ignored, a chain of
//! more than `MAX_SEGMENTS` non-empty descriptors (the iovec limit) is
//! refused, and
//! unknown request types are refused whatever their buffers.
//!
//! The status byte ([`status_byte`]) is known, refused or not, unless the
//! chain breaks off (the walk stops on a descriptor that still has
//! VIRTQ_DESC_F_NEXT: a loop, a next index outside the table, 2^32 bytes),
//! has no device-writable byte, has a device-readable descriptor after a
//! device-writable one, or its last device-writable byte is outside guest
//! memory: then the chain is refused with no status written.

use std::fmt;

use pinblk::guest::{GuestMem, GuestRange, Sector};
use pinblk::virtio_blk::chain::MAX_SEGMENTS;
use pinblk::virtio_blk::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use pinblk::virtio_blk::{Command, Limits, Segment};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::input::in_guest_memory;

/// Bytes of `virtio_blk_outhdr`.
const OUTHDR: u64 = 16;
/// Bytes of one DISCARD / WRITE_ZEROES segment.
const SEGMENT: u64 = 16;

/// One descriptor as the chain yields it (indirect tables already followed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VIRTQ_DESC_F_WRITE: device-writable.
    pub write: bool,
    /// VIRTQ_DESC_F_NEXT: the chain goes on after this descriptor.
    pub next: bool,
}

impl fmt::Debug for Desc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.write { "w" } else { "r" };
        let next = if self.next { "->" } else { "" };
        write!(f, "{dir}({:#x}+{:#x}){next}", self.addr, self.len)
    }
}

impl From<Descriptor> for Desc {
    fn from(d: Descriptor) -> Desc {
        Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
            next: d.has_next(),
        }
    }
}

impl Desc {
    /// Whether guest-physical byte `gpa` is in this descriptor's buffer.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.addr && u128::from(gpa) < u128::from(self.addr) + u128::from(self.len)
    }
}

/// What the model expects of an accepted request.
#[derive(Debug)]
pub struct Expected {
    /// Guest-physical address of the status byte.
    pub status: u64,
    /// The command with its checked ranges.
    pub command: Command,
    /// The data buffer (READ destination, WRITE source, GET_ID answer).
    pub data: Vec<GuestRange>,
}

/// The model's verdict on a chain.
#[derive(Debug)]
pub enum Verdict {
    /// A valid request.
    Accept(Expected),
    /// Refused, and why (for the failure message).
    Refuse(&'static str),
}

/// `len` bytes from byte `skip` of the concatenation of `ranges`.
fn sub_stream(ranges: &[GuestRange], mut skip: u64, mut len: u64) -> Vec<GuestRange> {
    let mut out = Vec::new();
    for r in ranges {
        let rl = u64::from(r.len);
        if skip >= rl {
            skip -= rl;
            continue;
        }
        let n = (rl - skip).min(len);
        if n > 0 {
            out.push(GuestRange {
                addr: r.addr + skip,
                len: n as u32,
            });
        }
        len -= n;
        skip = 0;
    }
    out
}

fn total(ranges: &[GuestRange]) -> u64 {
    ranges.iter().map(|r| u64::from(r.len)).sum()
}

fn read_stream(mem: &GuestMem, ranges: &[GuestRange]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for r in ranges {
        let mut buf = vec![0u8; r.len as usize];
        mem.read_slice(&mut buf, GuestAddress(r.addr)).ok()?;
        out.extend_from_slice(&buf);
    }
    Some(out)
}

/// The same byte stream as `ranges`, with empty ranges dropped and ranges
/// that continue one another merged: two buffers are the same buffer iff
/// their normal forms are equal.
pub fn normalize(ranges: &[GuestRange]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in ranges.iter().filter(|r| r.len > 0) {
        match out.last_mut() {
            Some((a, l)) if a.checked_add(*l) == Some(r.addr) => *l += u64::from(r.len),
            _ => out.push((r.addr, u64::from(r.len))),
        }
    }
    out
}

/// The split of a well-framed chain: readable and writable byte streams
/// (non-empty descriptors only), or why the framing is bad.
struct Framed {
    readable: Vec<GuestRange>,
    writable: Vec<GuestRange>,
}

fn frame(descs: &[Desc]) -> Result<Framed, &'static str> {
    if descs.iter().filter(|d| d.len > 0).count() > MAX_SEGMENTS {
        return Err("more descriptors than MAX_SEGMENTS");
    }
    let mut f = Framed {
        readable: Vec::new(),
        writable: Vec::new(),
    };
    for d in descs.iter().filter(|d| d.len > 0) {
        if !in_guest_memory(d.addr, u64::from(d.len)) {
            return Err("descriptor outside guest memory");
        }
        let r = GuestRange {
            addr: d.addr,
            len: d.len,
        };
        if d.write {
            f.writable.push(r);
        } else if !f.writable.is_empty() {
            return Err("device-readable descriptor after a device-writable one");
        } else {
            f.readable.push(r);
        }
    }
    Ok(f)
}

/// The request type in the header, if the chain is framed well enough to
/// have one.
fn header(mem: &GuestMem, f: &Framed) -> Option<(u32, u64)> {
    if total(&f.readable) < OUTHDR {
        return None;
    }
    let h = read_stream(mem, &sub_stream(&f.readable, 0, OUTHDR))?;
    let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    Some((kind, sector))
}

/// Whether VIRTIO_BLK_S_UNSUPP can be a right answer to this chain: its
/// type is not one of the four types that have no flags (IN, OUT, FLUSH,
/// GET_ID), or the chain has no readable header at all.
pub fn may_be_unsupported(mem: &GuestMem, descs: &[Desc]) -> bool {
    let Some((kind, _)) = frame(descs).ok().and_then(|f| header(mem, &f)) else {
        return true;
    };
    ![
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
    ]
    .contains(&kind)
}

/// Whether the walk of the chain stopped on a descriptor that still has
/// VIRTQ_DESC_F_NEXT (virtio-queue stops at a loop, a next index outside the
/// table, a bad indirect table, or 2^32 bytes): its end is unknown.
pub fn unterminated(descs: &[Desc]) -> bool {
    descs.last().is_some_and(|d| d.next)
}

/// The guest-physical address of the chain's status byte, refused or not:
/// the last byte of its device-writable part (all its descriptors, however
/// many), or `None` (see the module documentation).
pub fn status_byte(descs: &[Desc]) -> Option<u64> {
    if unterminated(descs) {
        return None;
    }
    let mut last_writable = None;
    for d in descs.iter().filter(|d| d.len > 0) {
        if d.write {
            last_writable = Some(d);
        } else if last_writable.is_some() {
            return None;
        }
    }
    let d = last_writable?;
    let byte = u64::try_from(u128::from(d.addr) + u128::from(d.len) - 1).ok()?;
    in_guest_memory(byte, 1).then_some(byte)
}

/// What pinblk must make of the chain `descs` over `mem` on a device with
/// `limits`.
pub fn expect(mem: &GuestMem, descs: &[Desc], limits: &Limits) -> Verdict {
    match expect_inner(mem, descs, limits) {
        Ok(e) => Verdict::Accept(e),
        Err(why) => Verdict::Refuse(why),
    }
}

fn expect_inner(mem: &GuestMem, descs: &[Desc], limits: &Limits) -> Result<Expected, &'static str> {
    if unterminated(descs) {
        return Err("chain breaks off on a descriptor with NEXT set");
    }
    let f = frame(descs)?;
    let Some(last) = f.writable.last() else {
        return Err("no device-writable byte for the status");
    };
    let status = last.addr + u64::from(last.len) - 1;
    let Some((kind, sector)) = header(mem, &f) else {
        return Err("header shorter than 16 bytes");
    };
    let readable_data = sub_stream(&f.readable, OUTHDR, u64::MAX);
    let writable_data = sub_stream(&f.writable, 0, total(&f.writable) - 1);
    let (data, other) = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => (writable_data, readable_data),
        VIRTIO_BLK_T_OUT
        | VIRTIO_BLK_T_FLUSH
        | VIRTIO_BLK_T_DISCARD
        | VIRTIO_BLK_T_WRITE_ZEROES => (readable_data, writable_data),
        _ => return Err("unknown request type"),
    };
    if total(&other) != 0 {
        return Err("data in descriptors of the wrong direction");
    }
    let len = total(&data);
    if len > u64::from(u32::MAX) {
        return Err("data of 4 GiB or more");
    }
    let writes = [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ]
    .contains(&kind);
    if writes && limits.read_only {
        return Err("write on a read-only device");
    }
    let in_capacity = |sector: u64, sectors: u64| {
        u128::from(sector) + u128::from(sectors) <= u128::from(limits.capacity)
    };
    let command = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if len > u64::from(limits.max_transfer) {
                return Err("transfer larger than the largest transfer");
            }
            let lbs = u64::from(limits.logical_block_size);
            if !len.is_multiple_of(lbs) {
                return Err("length not in logical blocks");
            }
            if !sector.is_multiple_of(lbs / 512) {
                return Err("sector not on a logical block");
            }
            if !in_capacity(sector, len / 512) {
                return Err("transfer past capacity");
            }
            if kind == VIRTIO_BLK_T_IN {
                Command::Read {
                    sector: Sector(sector),
                }
            } else {
                Command::Write {
                    sector: Sector(sector),
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => Command::Flush,
        VIRTIO_BLK_T_GET_ID => Command::GetId,
        _ => {
            if len == 0
                || !len.is_multiple_of(SEGMENT)
                || len / SEGMENT > u64::from(MAX_DISCARD_SEG)
            {
                return Err("not 1..=MAX_DISCARD_SEG segments");
            }
            let bytes = read_stream(mem, &data).ok_or("segments unreadable")?;
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let mut segs = Vec::new();
            for s in bytes.chunks_exact(SEGMENT as usize) {
                let sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
                let unmap = flags == VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
                if flags != 0 && !unmap {
                    return Err("unknown segment flags");
                }
                if unmap && discard {
                    return Err("UNMAP on a DISCARD segment");
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err("segment longer than MAX_DISCARD_SECTORS");
                }
                if !in_capacity(sector, u64::from(sectors)) {
                    return Err("segment past capacity");
                }
                if sectors > 0 {
                    segs.push(Segment {
                        sector: Sector(sector),
                        sectors,
                        unmap,
                    });
                }
            }
            if discard {
                Command::Discard(segs)
            } else {
                Command::WriteZeroes(segs)
            }
        }
    };
    let data = match command {
        Command::Read { .. } | Command::Write { .. } | Command::GetId => data,
        _ => Vec::new(),
    };
    Ok(Expected {
        status,
        command,
        data,
    })
}
