//! Requests answered without storage: a refused chain (its status, or used
//! length 0 without a status byte) and GET_ID (virtio 1.2 §5.2.6).

use std::sync::atomic::Ordering;

use super::lifecycle::{IOERR, OK};
use super::{GuestMem, QueueWorker};
use crate::guest::write_ranges;
use crate::virtio_blk::chain::ID_LEN;
use crate::virtio_blk::{Refused, Request};

impl QueueWorker {
    /// A refused chain: logged, completed with its status (or with used
    /// length 0 when it has no status byte).
    pub(super) fn refuse(&mut self, mem: &GuestMem, r: Refused) {
        match (r.status_addr, r.kind) {
            (None, _) => {
                log::warn!(
                    "queue {}: {} (head {}); no status byte, completing with length 0",
                    self.index,
                    r.error,
                    r.head
                );
                self.counters().dropped.fetch_add(1, Ordering::Relaxed);
            }
            (Some(_), None) => log::warn!(
                "queue {}: {} (head {}); completing with IOERR",
                self.index,
                r.error,
                r.head
            ),
            (Some(_), Some(kind)) => log::warn!(
                "queue {}: {} sector {} len {} (head {}): {}",
                self.index,
                kind.name(),
                r.sector,
                r.data_len,
                r.head,
                r.error
            ),
        }
        let used = u32::from(r.status_addr.is_some());
        self.push_used(mem, r.head, r.status_addr, r.error.status(), used);
    }

    /// GET_ID: the serial (at most 20 bytes) into the data buffer.
    pub(super) fn get_id(&mut self, mem: &GuestMem, req: &Request) {
        let mut id = [0u8; ID_LEN];
        let serial = self.dev.config().serial.as_bytes();
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        let n = (req.data_len as usize).min(ID_LEN);
        let (status, used) = match write_ranges(mem, &req.data, 0, &id[..n]) {
            Ok(()) => (OK, n as u32 + 1),
            Err(e) => {
                log::warn!("queue {}: GET_ID: cannot write id: {e}", self.index);
                (IOERR, 1)
            }
        };
        self.push_used(mem, req.head, Some(req.status_addr), status, used);
    }
}
