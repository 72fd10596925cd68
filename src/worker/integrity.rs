//! The data path's side of integrity (docs/DESIGN.md §3 R3, R4; §7): checksums of each
//! WRITE taken at submission and compared at completion (torn writes), the
//! store updated as requests complete, READs verified against the store with
//! a recheck from the image before a failure is reported, FLUSH making the
//! store durable.

use std::os::unix::fs::FileExt;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

use super::events::emit;
use super::job::{ChunkCrcList, Io, Job, Stage};
use super::memory::with_job_view;
use super::QueueWorker;
use crate::guest::{iter_ranges, read_ranges, SECTOR_SIZE};
use crate::integrity::OnMismatch;
use crate::integrity::{crc32c, crc32c_append, BLOCK_SIZE};
use crate::report::{
    gpa_range, Algorithm, BlockCsum, ChecksumAction, ChecksumFailureEvent, Crc, Event, Outcome,
    ReportOp, TornWriteAction, TornWriteEvent,
};
use crate::rule::Rule;
use crate::sigbus;
use crate::virtio_blk::Command;

/// Bytes of guest data copied at a time where a copy is needed (a
/// partial-block WRITE, zero-copy): the size of the worker's scratch buffer,
/// whatever the request's size (a multiple of 4 KiB).
pub(super) const CHECKSUM_WINDOW: usize = 1 << 20;

/// CRC32C of each 4 KiB chunk of a byte stream fed in pieces of any size
/// (the last chunk may be shorter).
struct ChunkCrcs {
    crcs: ChunkCrcList,
    crc: u32,
    filled: usize,
}

impl ChunkCrcs {
    /// For a stream of `len` bytes.
    fn with_len(len: u64) -> ChunkCrcs {
        ChunkCrcs {
            crcs: ChunkCrcList::with_capacity(len.div_ceil(BLOCK_SIZE) as usize),
            crc: 0,
            filled: 0,
        }
    }

    /// Feeds a scatter list, in order.
    fn feed_all(&mut self, slices: &[&[u8]]) {
        slices.iter().for_each(|s| self.feed(s));
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = (BLOCK_SIZE as usize - self.filled).min(data.len());
            self.crc = crc32c_append(self.crc, &data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == BLOCK_SIZE as usize {
                self.crcs.push(self.crc);
                (self.crc, self.filled) = (0, 0);
            }
        }
    }

    /// The CRC of each chunk, in order.
    fn finish(mut self) -> ChunkCrcList {
        if self.filled > 0 {
            self.crcs.push(self.crc);
        }
        self.crcs
    }
}

impl QueueWorker {
    /// Hands `each` the bytes of `f`'s data buffer as they are now, as a
    /// scatter list, without copying them: its bounce buffer, or the pinned
    /// guest memory itself ([`with_job_view`]). `false` (after a log line)
    /// if guest memory cannot be read or was lost under the access
    /// ([`crate::sigbus`]: then whatever `each` computed must be dropped), or
    /// if `each` returns `false`.
    fn each_view(f: &Job, each: impl FnOnce(&[&[u8]]) -> bool) -> bool {
        if let Some(b) = f.bounce() {
            return each(&[b.bytes()]);
        }
        match with_job_view(f, each) {
            Err(e) => {
                log::warn!("request {}: cannot checksum the guest buffer: {e}", f.id);
                false
            }
            Ok(ok) => {
                let ranges = f.req.data.iter().map(|r| (r.addr, u64::from(r.len)));
                ok && !sigbus::lost(&f.mem, ranges)
            }
        }
    }

    /// Hands `each(offset, bytes)` the bytes of `f`'s guest buffer as they are
    /// now, in order, copied into `scratch` in windows of at most
    /// [`CHECKSUM_WINDOW`] bytes (so the scratch buffer never grows with the
    /// request). A window ends where `base + offset` is a multiple of 4 KiB
    /// (`base` = the image offset: image blocks), so no block spans two
    /// windows. Only for what must be computed twice from the same bytes (a
    /// partial-block WRITE's chunk CRCs and merged checksums). `false` as
    /// [`QueueWorker::each_view`].
    fn each_copied_window(
        scratch: &mut Vec<u8>,
        f: &Job,
        base: u64,
        mut each: impl FnMut(u64, &[u8]) -> bool,
    ) -> bool {
        let len = u64::from(f.req.data_len);
        if scratch.len() < CHECKSUM_WINDOW {
            scratch.resize(CHECKSUM_WINDOW, 0);
        }
        let mut off = 0u64;
        while off < len {
            let to_edge = CHECKSUM_WINDOW as u64 - (base + off) % BLOCK_SIZE;
            let n = to_edge.min(len - off) as usize;
            let window = &mut scratch[..n];
            if let Err(e) = read_ranges(&*f.mem, &f.req.data, off, window) {
                log::warn!(
                    "request {}: cannot read guest buffer to checksum it: {e}",
                    f.id
                );
                return false;
            }
            let ranges = iter_ranges(&f.req.data, off, n as u64);
            if sigbus::lost(&f.mem, ranges.map(|r| (r.addr, u64::from(r.len)))) {
                return false;
            }
            if !each(off, window) {
                return false;
            }
            off += n as u64;
        }
        true
    }

    /// At submission of a WRITE (its range lock held): the CRC32C of every
    /// 4 KiB chunk of the bytes submitted (R3), and for a WRITE that covers
    /// blocks only partly, the checksum of each touched block as the guest
    /// means it to be: the image's bytes around the request, which no other
    /// request may change while the lock is held, merged with the submitted
    /// bytes (so a torn partial-block write fails verification on read-back).
    pub(super) fn integrity_submit(&mut self, slot: u32) {
        // Field borrows (no Arc clone per request).
        let dev = &self.dev;
        let Some(store) = dev.store() else {
            return;
        };
        let f = self.jobs.get_mut(slot).expect("slot in use");
        if !f.is_write() {
            return;
        }
        let offset = f.req.sector().bytes();
        let len = u64::from(f.req.data_len);
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
        // A bounced WRITE's chunk CRCs were taken while it was copied in
        // (fused copy and checksum); its buffer is stable since.
        let fused = f
            .transfer()
            .is_some_and(|t| t.bounce.is_some() && t.crcs.len() as u64 == len.div_ceil(BLOCK_SIZE));
        if aligned && fused {
            return;
        }
        // The same bytes serve both: the chunk CRCs (R3) and, for partial
        // blocks, the merged block checksums the store takes.
        let mut chunks = ChunkCrcs::with_len(len);
        let mut merged = Vec::new();
        let mut merge_failed = false;
        let image = dev.image().file();
        let read_rest = |off: u64, buf: &mut [u8]| image.read_exact_at(buf, off);
        let id = f.id;
        let mut take = |off: u64, data: &[&[u8]]| {
            if !fused {
                chunks.feed_all(data);
            }
            if !aligned && !merge_failed {
                match store.checksums_with(offset + off, data, read_rest) {
                    Ok(m) => merged.extend(m),
                    Err(e) => {
                        log::warn!(
                            "request {id}: cannot read the rest of a partly written block: {e}"
                        );
                        merge_failed = true;
                    }
                }
            }
            true
        };
        let copied = if aligned || f.bounce().is_some() {
            // Read in place (guest memory or the stable bounce buffer).
            Self::each_view(f, |data| take(0, data))
        } else {
            // Partial blocks from guest memory the guest may be changing:
            // chunk CRCs and merged checksums from one copy, so they agree.
            Self::each_copied_window(&mut self.scratch, f, offset, |off, w| take(off, &[w]))
        };
        if !copied {
            return;
        }
        if merge_failed {
            merged.clear();
        }
        if let Io::Transfer(t) = &mut f.io {
            if !fused {
                t.crcs = chunks.finish();
            }
            t.block_crcs = merged;
        }
    }

    /// At completion, before the used element is pushed and the range lock
    /// released: R3, R4, the store updated. A failed write, discard or
    /// write-zeroes leaves its blocks undefined: the store takes what the
    /// image holds now, so that no later READ reports it as corruption.
    pub(super) fn integrity_complete(&mut self, f: &mut Job) {
        let Some(store) = self.dev.store() else {
            return;
        };
        if f.status != VIRTIO_BLK_S_OK as u8 {
            // Only a request that reached storage can have changed the image
            // (one failed before, e.g. by the `fail` policy, holds no range
            // lock and must not touch the store).
            if !matches!(f.stage, Stage::Submitted { .. }) {
                return;
            }
            let image = self.dev.image().file();
            let read_image = |off: u64, buf: &mut [u8]| image.read_exact_at(buf, off);
            let res = match (&f.req.command, &f.io) {
                (Command::Write { sector }, _) => {
                    store.refresh_with(sector.bytes(), u64::from(f.req.data_len), read_image)
                }
                (_, Io::Segments(segs)) => segs
                    .iter()
                    .try_for_each(|s| store.refresh_with(s.offset(), s.len(), read_image)),
                _ => Ok(()),
            };
            if let Err(e) = res {
                log::error!("request {}: checksum store after a failed write: {e}", f.id);
            }
            return;
        }
        let submitted = f.transfer().map_or(0, |t| t.crcs.len());
        if f.is_write() && f.bounce().is_none() && submitted > 0 {
            self.check_torn(f);
        }
        if f.is_read() {
            self.verify_read(f);
            return;
        }
        let dev = &self.dev;
        let store = dev.store().expect("checked above");
        let image = dev.image().file();
        let read_image = |off: u64, buf: &mut [u8]| image.read_exact_at(buf, off);
        let offset = f.req.sector().bytes();
        let len = u64::from(f.req.data_len);
        let res = match (&f.req.command, &mut f.io) {
            (Command::Write { .. }, Io::Transfer(t)) => {
                let aligned = offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
                if aligned && t.crcs.len() as u64 == len / BLOCK_SIZE {
                    // The stored checksum is the submitted one (R3).
                    let first = offset / BLOCK_SIZE;
                    t.crcs
                        .iter()
                        .enumerate()
                        .try_for_each(|(i, &c)| store.set_expected(first + i as u64, c))
                } else if !t.block_crcs.is_empty() {
                    // Partial blocks: the merged checksums taken at submission.
                    let first = offset / BLOCK_SIZE;
                    t.block_crcs
                        .iter()
                        .enumerate()
                        .try_for_each(|(i, &c)| store.set_expected(first + i as u64, c))
                } else {
                    // No checksum taken at submission (guest memory unreadable):
                    // checksum the blocks as they are on disk now.
                    store.refresh_with(offset, len, read_image)
                }
            }
            (Command::Flush, Io::Flush(ticket)) => {
                // Both fdatasyncs (image, store) completed: regions with
                // nothing in flight since the FLUSH began are no longer suspect.
                if let Some(t) = ticket.take() {
                    store.flush_end(t);
                }
                Ok(())
            }
            (_, Io::Segments(segs)) => segs
                .iter()
                .try_for_each(|s| store.record_zero_with(s.offset(), s.len(), read_image)),
            _ => Ok(()),
        };
        if let Err(e) = res {
            log::error!("request {}: checksum store: {e}", f.id);
            f.status = VIRTIO_BLK_S_IOERR as u8;
        }
    }

    /// R3: compares the WRITE's buffer now with what was checksummed at
    /// submission; each changed 4 KiB chunk is a `torn_write`, with what
    /// reached the disk read back from the image.
    fn check_torn(&mut self, f: &Job) {
        let mut chunks = ChunkCrcs::with_len(u64::from(f.req.data_len));
        if !Self::each_view(f, |data| {
            chunks.feed_all(data);
            true
        }) {
            return;
        }
        let later = chunks.finish();
        let offset = f.req.sector().bytes();
        let submitted = f.transfer().map_or(&[][..], |t| &t.crcs[..]);
        for (i, (&sub, &lat)) in submitted.iter().zip(&later).enumerate() {
            if sub == lat {
                continue;
            }
            let chunk_off = offset + i as u64 * BLOCK_SIZE;
            let chunk_len = (u64::from(f.req.data_len) - i as u64 * BLOCK_SIZE).min(BLOCK_SIZE);
            let mut disk = vec![0u8; chunk_len as usize];
            let on_disk = match self.dev.image().file().read_exact_at(&mut disk, chunk_off) {
                Ok(()) => crc32c(&disk),
                Err(e) => {
                    log::warn!("request {}: cannot read back torn block: {e}", f.id);
                    0
                }
            };
            let outcome = if on_disk == sub {
                Outcome::SubmittedBytes
            } else if on_disk == lat {
                Outcome::LaterBytes
            } else {
                Outcome::Neither
            };
            let e = Event::new(TornWriteEvent {
                request_id: f.id,
                queue: self.index,
                op: ReportOp::Write,
                csum: BlockCsum {
                    sector: chunk_off / SECTOR_SIZE,
                    length: chunk_len,
                    block: chunk_off / BLOCK_SIZE,
                    algorithm: Algorithm::Crc32c,
                    expected: Crc(sub),
                    found: Crc(on_disk),
                },
                rule: Rule::R3,
                outcome,
                policy: self.dev.policy().policy,
                // Only zero-copy WRITEs are checked: a bounced one cannot tear.
                action: TornWriteAction::ZeroCopy,
                guest_ranges: guest_ranges_of(f, i as u64 * BLOCK_SIZE, chunk_len),
                detail: Some(format!(
                    "guest changed the buffer under DMA: crc32c {sub:#010x} at submission, {lat:#010x} at completion"
                )),
            });
            emit(&self.dev, &e);
        }
    }

    /// Verifies a completed READ against the store; a mismatching block is
    /// re-read from the image into a private buffer (R4) before it is
    /// reported as a `checksum_failure`.
    fn verify_read(&mut self, f: &mut Job) {
        let dev = &self.dev;
        let store = dev.store().expect("checked by caller");
        let offset = f.req.sector().bytes();
        let mut mismatches = Vec::new();
        let id = f.id;
        let guard = f.transfer().filter(|t| t.guard_done).map(|t| &t.crcs[..]);
        if let Some(crcs) = guard {
            // The engine's guard CRCs, taken as it copied the data: no
            // second pass over the guest buffer (and nothing the guest
            // wrote there since can be taken for the data read).
            match store.verify_crcs(offset / BLOCK_SIZE, crcs) {
                Ok(m) => mismatches = m,
                Err(e) => {
                    log::error!("request {id}: verify: {e}");
                    return;
                }
            }
        } else if !Self::each_view(f, |data| match store.verify(offset, data) {
            Ok(m) => {
                mismatches = m;
                true
            }
            Err(e) => {
                log::error!("request {id}: verify: {e}");
                false
            }
        }) {
            return;
        }
        for m in mismatches {
            let blen = store.block_len(m.block);
            let mut buf = vec![0u8; blen];
            let recheck = match self
                .dev
                .image()
                .file()
                .read_exact_at(&mut buf, m.block * BLOCK_SIZE)
            {
                Ok(()) => crc32c(&buf),
                Err(e) => {
                    log::warn!(
                        "request {}: R4 re-read of block {} failed: {e}",
                        f.id,
                        m.block
                    );
                    m.found
                }
            };
            if recheck == m.expected {
                log::debug!(
                    "request {}: block {} matched on re-read (R4): the guest buffer changed after the DMA",
                    f.id,
                    m.block
                );
                continue;
            }
            let action = if self.dev.on_mismatch() == OnMismatch::Eio {
                f.status = VIRTIO_BLK_S_IOERR as u8;
                ChecksumAction::Eio
            } else {
                ChecksumAction::Report
            };
            let e = Event::new(ChecksumFailureEvent {
                request_id: Some(f.id),
                queue: Some(self.index),
                op: ReportOp::Read,
                csum: BlockCsum::of_block(m.block, m.expected, recheck),
                rule: Rule::R4,
                policy: self.dev.policy().policy,
                action,
                guest_ranges: guest_ranges_of(
                    f,
                    m.block * BLOCK_SIZE - offset.min(m.block * BLOCK_SIZE),
                    blen as u64,
                ),
                detail: None,
            });
            emit(&self.dev, &e);
        }
    }
}

/// The guest-physical ranges of bytes `start..start+len` of `f`'s data buffer.
fn guest_ranges_of(f: &Job, mut start: u64, mut len: u64) -> Vec<String> {
    let mut out = Vec::new();
    for r in &f.req.data {
        let rlen = u64::from(r.len);
        if start >= rlen {
            start -= rlen;
            continue;
        }
        let n = (rlen - start).min(len);
        out.push(gpa_range(r.addr + start, n));
        len -= n;
        start = 0;
        if len == 0 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ChunkCrcs;
    use crate::integrity::crc32c;

    #[test]
    fn chunk_crcs_do_not_depend_on_how_the_stream_is_cut() {
        let data: Vec<u8> = (0..3 * 4096 + 700).map(|i| (i * 7 % 251) as u8).collect();
        let want: Vec<u32> = data.chunks(4096).map(crc32c).collect();
        for cut in [1usize, 512, 4095, 4096, 5000, data.len()] {
            let mut c = ChunkCrcs::with_len(data.len() as u64);
            data.chunks(cut).for_each(|p| c.feed(p));
            assert_eq!(c.finish().to_vec(), want, "pieces of {cut}");
        }
    }
}
