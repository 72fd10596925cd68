//! A small hand-built vhost-user frontend for tests that must send what a
//! well-behaved driver never sends: every vhost-user message goes through the
//! rust-vmm `vhost` crate's `Frontend`, and the split virtqueues (virtio 1.2
//! §2.7) are raw bytes the test writes itself into a memfd it owns, at guest
//! physical addresses (GPAs) it chooses. Nothing here checks that what the
//! test writes makes sense: that is the point.
//!
//! Every wait is bounded: each vhost-user message runs on a helper thread
//! and is given [`REPLY_TIMEOUT`] (unless [`TestFrontend::set_reply_timeout`])
//! for its reply; past that the connection is shut down (which ends the
//! helper's blocked read) and the call returns [`MsgError::NoAnswer`].
//! Used-ring waits take their own timeout. A backend that hangs fails the
//! test, never hangs it. (A socket read timeout would not do: the `vhost`
//! crate retries a read that returns EAGAIN, forever.)
//!
//! Guest memory is one memfd per region, mapped `MAP_SHARED` in the test. A
//! region may be declared to the backend with a size different from its
//! memfd's (and the memfd truncated later): the test must then not touch the
//! missing bytes itself (SIGBUS).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub use super::blk::*;
pub use super::guest_mem::Region;

/// How long a vhost-user message waits for the backend's reply by default.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// virtio 1.2 §2.7.5: `VIRTQ_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// virtio 1.2 §2.7.5: `VIRTQ_DESC_F_WRITE` (device-writable buffer).
pub const DESC_F_WRITE: u16 = 2;
/// virtio 1.2 §2.7.5.3: `VIRTQ_DESC_F_INDIRECT`.
pub const DESC_F_INDIRECT: u16 = 4;

/// Feature bit `VIRTIO_RING_F_EVENT_IDX` (virtio 1.2 §6).
pub const F_EVENT_IDX: u64 = 1 << 29;
/// Feature bit `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user spec).
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Feature bit `VHOST_F_LOG_ALL` (vhost-user spec, "Migration").
pub const F_LOG_ALL: u64 = 1 << 26;

/// How a vhost-user message failed.
#[derive(Debug)]
pub enum MsgError {
    /// The backend answered with a failure (REPLY_ACK with a non-zero value).
    Refused,
    /// No answer within the reply timeout.
    NoAnswer,
    /// The connection is gone (EOF, broken pipe) or the answer made no sense.
    Broken(String),
}

impl MsgError {
    fn from_vhost(e: vhost::Error) -> MsgError {
        use vhost::vhost_user::Error as U;
        match e {
            vhost::Error::VhostUserProtocol(U::BackendInternalError) => MsgError::Refused,
            vhost::Error::VhostUserProtocol(
                U::SocketError(ref io) | U::SocketRetry(ref io) | U::SocketBroken(ref io),
            ) if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
            {
                MsgError::NoAnswer
            }
            other => MsgError::Broken(other.to_string()),
        }
    }
}

/// Result of one vhost-user message.
pub type MsgResult<T> = Result<T, MsgError>;

/// Where a split virtqueue lives in guest memory (virtio 1.2 §2.7).
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    /// Queue size (entries), as sent in SET_VRING_NUM.
    pub size: u16,
    /// GPA of the descriptor table (16 bytes per entry).
    pub desc: u64,
    /// GPA of the available ring (`flags`, `idx`, `ring[size]`, `used_event`).
    pub avail: u64,
    /// GPA of the used ring (`flags`, `idx`, `ring[size]` of 8 bytes, `avail_event`).
    pub used: u64,
}

impl RingLayout {
    /// A ring of `size` entries laid out from `gpa` (4 KiB aligned): table,
    /// then the available ring, then the used ring on the next 4 KiB boundary.
    pub fn at(gpa: u64, size: u16) -> RingLayout {
        let n = u64::from(size);
        let desc = gpa;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 4095) & !4095;
        RingLayout {
            size,
            desc,
            avail,
            used,
        }
    }

    /// First byte after the ring (4 KiB aligned).
    pub fn end(&self) -> u64 {
        (self.used + 6 + 8 * u64::from(self.size) + 4095) & !4095
    }
}

/// The guest memory a [`TestFrontend`] creates: one region at GPA
/// `base_gpa`, a memfd of `mem_size` bytes, declared to the backend as
/// `region_size` bytes (normally equal).
#[derive(Clone, Copy, Debug)]
pub struct GuestLayout {
    /// Bytes of the memfd.
    pub mem_size: u64,
    /// Bytes declared in SET_MEM_TABLE (`memory_size`).
    pub region_size: u64,
    /// GPA of the region's first byte.
    pub base_gpa: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if the backend offers it.
    pub event_idx: bool,
}

impl GuestLayout {
    /// `mem_size` bytes at GPA 0, declared as they are.
    pub fn new(mem_size: u64) -> GuestLayout {
        GuestLayout {
            mem_size,
            region_size: mem_size,
            base_gpa: 0,
            event_idx: false,
        }
    }

    /// The same with VIRTIO_RING_F_EVENT_IDX negotiated.
    pub fn with_event_idx(mut self) -> GuestLayout {
        self.event_idx = true;
        self
    }
}

/// Per-queue state the test keeps: its layout, kick/call eventfds and the
/// next available index it will publish.
pub struct QueueState {
    /// Where the ring is.
    pub ring: RingLayout,
    /// The kick eventfd (SET_VRING_KICK).
    pub kick: EventFd,
    /// The call eventfd (SET_VRING_CALL).
    pub call: EventFd,
    /// The avail `idx` the test last published.
    pub avail_idx: u16,
}

/// A vhost-user frontend driving raw rings in test-owned memory.
pub struct TestFrontend {
    /// The vhost crate's frontend (messages).
    pub fe: Frontend,
    /// Guest memory regions (the first from [`GuestLayout`]).
    pub regions: Vec<Region>,
    /// Queues started with [`TestFrontend::start_queue`], by index.
    pub queues: Vec<Option<QueueState>>,
    /// Virtio features acked.
    pub features: u64,
    stream: UnixStream,
    timeout: Duration,
}

impl TestFrontend {
    /// Connects to `socket` and negotiates: SET_OWNER, GET/SET_FEATURES
    /// (everything offered but VHOST_F_LOG_ALL, VIRTIO_RING_F_EVENT_IDX only
    /// if `layout.event_idx`), GET/SET_PROTOCOL_FEATURES (CONFIG, MQ,
    /// REPLY_ACK, CONFIGURE_MEM_SLOTS, LOG_SHMFD as offered; every later
    /// message asks for REPLY_ACK), then SET_MEM_TABLE with the layout's
    /// region.
    pub fn connect(socket: &Path, layout: GuestLayout) -> TestFrontend {
        let mut f = Self::connect_raw(socket, layout.event_idx);
        let region = Region::new(layout.base_gpa, layout.mem_size, layout.region_size);
        let info = region.info();
        f.call(move |fe| fe.set_mem_table(&[info]).map(|_| ()))
            .unwrap_or_else(|e| panic!("SET_MEM_TABLE: {e:?}"));
        f.regions.push(region);
        f
    }

    /// Connects and negotiates features only: no memory table sent.
    pub fn connect_raw(socket: &Path, event_idx: bool) -> TestFrontend {
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if t.elapsed() < REPLY_TIMEOUT => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect {}: {e}", socket.display()),
            }
        };
        let fe = Frontend::from_stream(stream.try_clone().unwrap(), 64);
        let mut f = TestFrontend {
            fe,
            regions: Vec::new(),
            queues: Vec::new(),
            features: 0,
            stream,
            timeout: REPLY_TIMEOUT,
        };
        f.call(|fe| fe.set_owner()).expect("SET_OWNER");
        let offered = f.call(|fe| fe.get_features()).expect("GET_FEATURES");
        // VHOST_F_LOG_ALL only while migrating, as QEMU acks it
        // (migration tests set it themselves).
        let mut features = offered & !F_LOG_ALL;
        if !event_idx {
            features &= !F_EVENT_IDX;
        }
        f.call(move |fe| fe.set_features(features))
            .expect("SET_FEATURES");
        f.features = features;
        if offered & F_PROTOCOL_FEATURES != 0 {
            let pf = f
                .call(|fe| fe.get_protocol_features())
                .expect("GET_PROTOCOL_FEATURES");
            let want = VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::LOG_SHMFD;
            f.call(move |fe| fe.set_protocol_features(pf & want))
                .expect("SET_PROTOCOL_FEATURES");
            if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        f
    }

    /// Runs one vhost-user exchange on a helper thread, waiting at most the
    /// reply timeout; on timeout the connection is shut down (ending the
    /// helper's read) and the result is [`MsgError::NoAnswer`].
    pub fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Frontend) -> vhost::Result<T> + Send + 'static,
    ) -> MsgResult<T> {
        let mut fe = self.fe.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let helper = std::thread::spawn(move || {
            let _ = tx.send(op(&mut fe));
        });
        match rx.recv_timeout(self.timeout) {
            Ok(r) => {
                let _ = helper.join();
                r.map_err(MsgError::from_vhost)
            }
            Err(_) => {
                self.disconnect();
                let _ = helper.join();
                Err(MsgError::NoAnswer)
            }
        }
    }

    /// Changes how long each message waits for its reply.
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & F_EVENT_IDX != 0
    }

    /// Closes the connection (shutdown of both directions; the socket fd
    /// itself is closed when the frontend is dropped).
    pub fn disconnect(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    // ---- guest memory --------------------------------------------------

    fn region_of(&self, gpa: u64, len: usize) -> &Region {
        self.regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .unwrap_or_else(|| panic!("GPA {gpa:#x}+{len} is in no region of the test"))
    }

    /// Writes `bytes` at `gpa`.
    pub fn write_mem(&self, gpa: u64, bytes: &[u8]) {
        let p = self.region_of(gpa, bytes.len()).host(gpa, bytes.len());
        // SAFETY: in bounds of a shared mapping we own; the backend may read
        // it concurrently, which is the shared-memory protocol itself.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read_mem(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.region_of(gpa, len).host(gpa, len);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of a shared mapping we own.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill_mem(&self, gpa: u64, len: usize, byte: u8) {
        let p = self.region_of(gpa, len).host(gpa, len);
        // SAFETY: in bounds of a shared mapping we own.
        unsafe { std::ptr::write_bytes(p, byte, len) };
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        let p = self.region_of(gpa, 2).host(gpa, 2) as *mut u16;
        // SAFETY: in bounds; ring fields are 2-byte aligned in every layout
        // the rings use, and a volatile store is what the other side polls.
        unsafe { p.write_volatile(v.to_le()) };
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let p = self.region_of(gpa, 2).host(gpa, 2) as *const u16;
        // SAFETY: as in write_u16.
        u16::from_le(unsafe { p.read_volatile() })
    }

    /// Reads the byte at `gpa` (a status byte).
    pub fn read_u8(&self, gpa: u64) -> u8 {
        let p = self.region_of(gpa, 1).host(gpa, 1);
        // SAFETY: in bounds of a shared mapping we own.
        unsafe { p.read_volatile() }
    }

    /// Sets the file size of region `i`'s memfd (e.g. shorter than declared).
    pub fn truncate_region(&self, i: usize, len: u64) {
        self.regions[i].file.set_len(len).unwrap();
    }

    // ---- rings ------------------------------------------------------------

    fn q(&self, q: usize) -> &QueueState {
        self.queues
            .get(q)
            .and_then(|s| s.as_ref())
            .unwrap_or_else(|| panic!("queue {q} not started"))
    }

    /// SET_VRING_ADDR again on the running queue `q`, same addresses, with
    /// VHOST_VRING_F_LOG if `log`: what QEMU sends when a migration turns
    /// dirty logging on or off.
    pub fn set_vring_addr_again(&self, q: usize, log: bool) -> MsgResult<()> {
        let ring = self.ring(q);
        let host = |gpa: u64| self.region_of(gpa, 1).host(gpa, 1) as u64;
        let cfg = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: u32::from(log),
            desc_table_addr: host(ring.desc),
            used_ring_addr: host(ring.used),
            avail_ring_addr: host(ring.avail),
            log_addr: log.then_some(ring.used),
        };
        self.call(move |fe| fe.set_vring_addr(q, &cfg))
    }

    /// Starts queue `q` on `ring`: zeroes the ring memory, then SET_VRING_NUM,
    /// SET_VRING_BASE 0, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL and
    /// SET_VRING_ENABLE 1 (vhost-user spec, "Starting and stopping rings").
    pub fn start_queue(&mut self, q: usize, ring: RingLayout) -> MsgResult<()> {
        self.fill_mem(ring.desc, (ring.end() - ring.desc) as usize, 0);
        self.set_vring_num(q, ring.size)?;
        self.set_vring_base(q, 0)?;
        let host = |gpa: u64| self.region_of(gpa, 1).host(gpa, 1) as u64;
        let cfg = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: host(ring.desc),
            used_ring_addr: host(ring.used),
            avail_ring_addr: host(ring.avail),
            log_addr: None,
        };
        self.call(move |fe| fe.set_vring_addr(q, &cfg))?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let k = kick.try_clone().unwrap();
        self.call(move |fe| fe.set_vring_kick(q, &k))?;
        let c = call.try_clone().unwrap();
        self.call(move |fe| fe.set_vring_call(q, &c))?;
        if self.queues.len() <= q {
            self.queues.resize_with(q + 1, || None);
        }
        self.queues[q] = Some(QueueState {
            ring,
            kick,
            call,
            avail_idx: 0,
        });
        self.set_vring_enable(q, true)
    }

    /// The ring layout of queue `q`.
    pub fn ring(&self, q: usize) -> RingLayout {
        self.q(q).ring
    }

    /// Writes descriptor `i` of queue `q` (virtio 1.2 §2.7.5).
    pub fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let ring = self.ring(q);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        // Index taken modulo nothing: a hostile test may write past the table.
        self.write_mem(ring.desc + 16 * u64::from(i), &d);
    }

    /// Appends `heads` to queue `q`'s available ring and publishes the new
    /// `idx` (after a fence, virtio 1.2 §2.7.13).
    pub fn publish(&mut self, q: usize, heads: &[u16]) {
        let st = self.q(q);
        let (ring, mut idx) = (st.ring, st.avail_idx);
        for &h in heads {
            let slot = u64::from(idx % ring.size);
            self.write_u16(ring.avail + 4 + 2 * slot, h);
            idx = idx.wrapping_add(1);
        }
        self.set_avail_idx(q, idx);
    }

    /// Sets queue `q`'s avail `idx` to any value (also remembered as the
    /// next index [`TestFrontend::publish`] appends at).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let ring = self.ring(q);
        fence(Ordering::SeqCst);
        self.write_u16(ring.avail + 2, idx);
        fence(Ordering::SeqCst);
        self.queues[q].as_mut().unwrap().avail_idx = idx;
    }

    /// Writes the avail ring's `used_event` (EVENT_IDX, virtio 1.2 §2.7.10).
    pub fn set_used_event(&self, q: usize, v: u16) {
        let ring = self.ring(q);
        self.write_u16(ring.avail + 4 + 2 * u64::from(ring.size), v);
    }

    /// Kicks queue `q` (available buffer notification).
    pub fn kick(&self, q: usize) {
        self.q(q).kick.write(1).unwrap();
    }

    /// The used ring's `idx` of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let v = self.read_u16(self.ring(q).used + 2);
        fence(Ordering::SeqCst);
        v
    }

    /// Used element `i` (mod queue size) of queue `q`: (`id`, `len`).
    pub fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let ring = self.ring(q);
        let at = ring.used + 4 + 8 * u64::from(i % ring.size);
        let b = self.read_mem(at, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// The used ring's `avail_event` of queue `q` (EVENT_IDX).
    pub fn avail_event(&self, q: usize) -> u16 {
        let ring = self.ring(q);
        self.read_u16(ring.used + 4 + 8 * u64::from(ring.size))
    }

    /// Waits until queue `q`'s used `idx` has advanced to `target` (or past
    /// it, modulo 2^16 within half the space). `Ok` with the index seen, or
    /// `Err` with the last index seen at `timeout`.
    pub fn wait_used(&self, q: usize, target: u16, timeout: Duration) -> Result<u16, u16> {
        let t = Instant::now();
        loop {
            let now = self.used_idx(q);
            if target.wrapping_sub(now) == 0 || now.wrapping_sub(target) < 0x8000 {
                return Ok(now);
            }
            if t.elapsed() >= timeout {
                return Err(now);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    // ---- virtio-blk requests ------------------------------------------------

    /// Writes a virtio-blk request (virtio 1.2 §5.2.6) as a chain of
    /// descriptors `first`, `first+1`(, `first+2`) of queue `q`: the
    /// `virtio_blk_outhdr` (type, reserved, sector) at `req.hdr`, the data
    /// buffer `req.data` if any (device-writable for a READ), and the status
    /// byte at `req.status` (pre-set to 0xff). Returns the head index.
    pub fn write_request(&self, q: usize, first: u16, req: &BlkRequest) -> u16 {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req.kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&req.sector.to_le_bytes());
        self.write_mem(req.hdr, &hdr);
        self.write_mem(req.status, &[0xff]);
        let mut i = first;
        self.write_desc(q, i, req.hdr, 16, DESC_F_NEXT, i.wrapping_add(1));
        i = i.wrapping_add(1);
        if let Some((addr, len)) = req.data {
            let w = if req.kind == VIRTIO_BLK_T_IN || req.kind == VIRTIO_BLK_T_GET_ID {
                DESC_F_WRITE
            } else {
                0
            };
            self.write_desc(q, i, addr, len, w | DESC_F_NEXT, i.wrapping_add(1));
            i = i.wrapping_add(1);
        }
        self.write_desc(q, i, req.status, 1, DESC_F_WRITE, 0);
        first
    }

    // ---- raw vhost-user messages -----------------------------------------

    /// SET_VRING_NUM (vhost-user spec).
    pub fn set_vring_num(&self, q: usize, num: u16) -> MsgResult<()> {
        self.call(move |fe| fe.set_vring_num(q, num))
    }

    /// SET_VRING_BASE: the next avail index the backend will use.
    pub fn set_vring_base(&self, q: usize, base: u16) -> MsgResult<()> {
        self.call(move |fe| fe.set_vring_base(q, base))
    }

    /// GET_VRING_BASE: stops the ring; the backend's next avail index.
    pub fn get_vring_base(&self, q: usize) -> MsgResult<u32> {
        self.call(move |fe| fe.get_vring_base(q))
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, q: usize, enable: bool) -> MsgResult<()> {
        self.call(move |fe| fe.set_vring_enable(q, enable))
    }

    /// ADD_MEM_REG of a new memfd region (kept in `regions` if accepted).
    pub fn add_mem_region(&mut self, region: Region) -> MsgResult<()> {
        let info = region.info();
        let r = self.call(move |fe| fe.add_mem_region(&info).map(|_| ()));
        if r.is_ok() {
            self.regions.push(region);
        }
        r
    }

    /// REM_MEM_REG of region `i` (the test keeps its own mapping).
    pub fn remove_mem_region(&mut self, i: usize) -> MsgResult<()> {
        let info = self.regions[i].info();
        self.call(move |fe| fe.remove_mem_region(&info))
    }

    /// REM_MEM_REG of an arbitrary (GPA, size).
    pub fn remove_mem_range(&mut self, gpa: u64, size: u64) -> MsgResult<()> {
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: 0,
            mmap_offset: 0,
            mmap_handle: -1,
        };
        self.call(move |fe| fe.remove_mem_region(&info))
    }

    /// SET_MEM_TABLE with `regions` (replacing the test's own list).
    pub fn set_mem_table(&mut self, regions: Vec<Region>) -> MsgResult<()> {
        let infos: Vec<_> = regions.iter().map(Region::info).collect();
        let r = self.call(move |fe| fe.set_mem_table(&infos).map(|_| ()));
        self.regions = regions;
        r
    }
}
