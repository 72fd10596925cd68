//! The `VhostUserBackend` of one vhost-user connection.
//!
//! Each virtqueue has its own worker thread (`queues_per_thread` = one queue
//! per thread) and its own [`QueueWorker`] behind its own mutex, touched only
//! by that thread (and by GET_VRING_BASE when the ring stops), so there is no
//! lock around the whole backend. Each worker's io_uring completion eventfd is
//! registered on that thread's epoll loop as event `num_queues + 1`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::Device;
use crate::inflight::InflightRegion;
use crate::worker::{GuestMemAtomic, QueueWorker, Vring, WorkerError};

/// How much longer than the stall timeout a ring stop (GET_VRING_BASE)
/// waits for the requests in flight: 5 s (docs/DESIGN.md §8, "Stopping a
/// ring"). A stall ends at once when a ring stops; what is left is storage,
/// which normally completes in milliseconds.
pub const RING_STOP_GRACE: Duration = Duration::from_secs(5);

/// The longest a ring stop waits for the requests in flight: the stall
/// timeout (`--stall-timeout`) plus [`RING_STOP_GRACE`].
pub fn ring_stop_limit(stall_timeout: Duration) -> Duration {
    stall_timeout + RING_STOP_GRACE
}

/// What one connection saw of a live migration (docs/DESIGN.md §13).
#[derive(Default)]
struct MigrationState {
    /// VHOST_F_LOG_ALL is acked now.
    logging: AtomicBool,
    /// Rings last stopped with the log on, none started since.
    handed_over: AtomicBool,
    /// Requests in flight at GET_VRING_BASE, completed by its drain.
    drained_at_stop: AtomicU64,
}

/// Backend state of one connection.
pub struct BlkBackend {
    dev: Arc<Device>,
    /// This connection's number (from 1, per process), as log lines and
    /// the `migration` event name it.
    connection: u64,
    /// What this connection saw of a migration (docs/DESIGN.md §13).
    migration: MigrationState,
    workers: Vec<Mutex<QueueWorker>>,
    exit: Vec<(EventConsumer, EventNotifier)>,
    /// The inflight I/O tracking record (vhost-user), once the frontend
    /// asked for one (GET_INFLIGHT_FD) or handed one back (SET_INFLIGHT_FD).
    inflight: Mutex<Option<Arc<InflightRegion>>>,
}

impl BlkBackend {
    /// A backend for connection number `connection` to `dev`, using `mem`,
    /// the guest memory handle also given to the daemon, with its queues in
    /// lane `lane` of the device's per-queue slots (below
    /// [`crate::device::MAX_CONNECTIONS`]).
    ///
    /// # Errors
    /// [`WorkerError`] if a queue's io_uring or an eventfd cannot be created.
    pub fn new(
        dev: Arc<Device>,
        mem: GuestMemAtomic,
        connection: u64,
        lane: u16,
    ) -> Result<Self, WorkerError> {
        let nq = dev.config().num_queues;
        let workers = (0..nq)
            .map(|i| QueueWorker::new_in_lane(dev.clone(), mem.clone(), lane, i).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let exit = (0..nq)
            .map(|i| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                    .map_err(|source| WorkerError::Setup { queue: i, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BlkBackend {
            dev,
            connection,
            migration: MigrationState::default(),
            workers,
            exit,
            inflight: Mutex::new(None),
        })
    }

    /// This connection's number.
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// Whether this connection handed its guest over (a migration source):
    /// its rings were last stopped while dirty logging was on
    /// (VHOST_F_LOG_ALL acked; vhost-user spec, "Migration"), and none was
    /// started again since (a failed migration restarts them).
    pub fn handed_over(&self) -> bool {
        self.migration.handed_over.load(Ordering::Acquire)
    }

    /// Requests in flight when this connection's rings were stopped
    /// (GET_VRING_BASE), completed (and their pins released) by the drain
    /// before the answer.
    pub fn drained_at_stop(&self) -> u64 {
        self.migration.drained_at_stop.load(Ordering::Acquire)
    }

    /// The event id under which a worker's completion eventfd is registered.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.dev.config().num_queues) + 1
    }

    /// Locks the worker of queue `index`.
    pub fn worker(&self, index: usize) -> MutexGuard<'_, QueueWorker> {
        self.workers[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Number of queues (= workers).
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Completes every in-flight request of every queue.
    pub fn drain_all(&self) {
        // In turns: a request of one queue may wait for an LBA range held by
        // another queue's request, which only that queue's worker completes.
        loop {
            let mut idle = true;
            for i in 0..self.workers.len() {
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(2);
                idle &= self.worker(i).drain_until(Some(deadline));
            }
            if idle {
                break;
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = crate::guest::DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.config().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.config().queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.config().features()
    }

    fn acked_features(&self, features: u64) {
        let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.migration.logging.swap(on, Ordering::AcqRel) != on {
            log::info!(
                "connection {}: dirty logging {} (VHOST_F_LOG_ALL{})",
                self.connection,
                if on { "on" } else { "off" },
                if on {
                    ": the frontend is migrating the guest"
                } else {
                    " cleared"
                }
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        crate::virtio_blk::config::DeviceConfig::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        for i in 0..self.workers.len() {
            self.worker(i).set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.config().read_config(offset, size)
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> std::io::Result<()> {
        // The workers read guest memory through the same `GuestMemoryAtomic`
        // the daemon updates (a clone given to `BlkBackend::new`), taking a
        // snapshot per popped chain. Regions larger than their files are
        // taken out again and refused; the rest is watched for SIGBUS.
        crate::sigbus::accept_memory(&mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exit.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> std::io::Result<(std::fs::File, u64)> {
        let region =
            InflightRegion::create(num_queues, queue_size).map_err(std::io::Error::other)?;
        let file = region.file().try_clone()?;
        let size = region.size();
        log::info!(
            "inflight I/O tracking: new {size}-byte record for {num_queues} queue(s) of {queue_size}"
        );
        *self.inflight.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        Ok((file, size))
    }

    fn set_inflight_fd(
        &self,
        file: std::fs::File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> std::io::Result<()> {
        let region = InflightRegion::open(file, mmap_offset, mmap_size, num_queues, queue_size)
            .map_err(|e| {
                log::error!("SET_INFLIGHT_FD refused: {e}");
                std::io::Error::other(e)
            })?;
        *self.inflight.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        Ok(())
    }

    fn vring_started(&self, queue_index: u16, vring: &Vring) -> std::io::Result<()> {
        // A ring running again: whatever was stopped for a migration is back.
        self.migration.handed_over.store(false, Ordering::Release);
        let Some(w) = self.workers.get(usize::from(queue_index)) else {
            return Ok(());
        };
        let region = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(region) = region {
            match region.queue(queue_index) {
                Some(part) => w.start_inflight(part, vring)?,
                None => log::warn!(
                    "inflight record has {} queue(s); queue {queue_index} is not tracked",
                    region.num_queues()
                ),
            }
        }
        // After the inflight record's recovery, which may move the next
        // avail index: the line says where popping really resumes.
        log::info!(
            target: crate::logging::RING_TARGET,
            "connection {}: queue {queue_index} started: {}",
            self.connection,
            w.ring_state(vring)
        );
        Ok(())
    }

    /// GET_VRING_BASE (vhost-user spec, "Starting and stopping rings"): the
    /// ring is already not ready (nothing more is popped); every request in
    /// flight is completed into the used ring before the answer, for at most
    /// [`ring_stop_limit`]. Past it the requests left may still be under DMA
    /// into guest memory, so there is no next index that describes the
    /// ring: the error makes the vhost-user library drop the connection
    /// without an answer, and those requests are finished inside pinblk,
    /// unreported (docs/DESIGN.md §8, "Stopping a ring").
    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let Some(w) = self.workers.get(queue_index as usize) else {
            return Ok(());
        };
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight = w.inflight() as u64;
        w.stop(ring_stop_limit(self.dev.policy().stall_timeout))
            .inspect_err(|e| log::error!("GET_VRING_BASE: {e}; dropping the connection"))?;
        if let Some(vring) = w.vring() {
            log::info!(
                target: crate::logging::RING_TARGET,
                "connection {}: queue {queue_index} stopped after draining {in_flight} request(s): {}",
                self.connection,
                w.ring_state(&vring)
            );
        }
        let m = &self.migration;
        m.drained_at_stop.fetch_add(in_flight, Ordering::AcqRel);
        if m.logging.load(Ordering::Acquire) {
            // Stopped with the dirty log on: the source of a migration
            // stopping its rings before the switch-over.
            m.handed_over.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("queue {thread_id}: unexpected event set {evset:?}");
        }
        // Each thread serves one queue: its vring is vrings[0], kicks arrive as event 0.
        let Some(vring) = vrings.first() else {
            log::error!("worker thread {thread_id} has no vring");
            return Ok(());
        };
        let mut worker = self.worker(thread_id);
        worker.woke();
        if u64::from(device_event) == self.completion_event_id() {
            worker.complete(vring);
        } else if usize::from(device_event) < vrings.len() {
            worker.process_queue(vring);
        } else {
            log::warn!("queue {thread_id}: unknown event {device_event}");
            return Ok(());
        }
        // Busy-poll for what follows closely before going back to epoll
        // (bounded; docs/DESIGN.md §8 "Polling").
        worker.poll(vring);
        Ok(())
    }
}
