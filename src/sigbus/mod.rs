//! Guest memory that the frontend can take away (docs/DESIGN.md §5, "Guest
//! memory that vanishes"; issue 13 finding 5).
//!
//! A vhost-user frontend hands over each guest memory region as a file
//! descriptor with an offset and a size (vhost-user spec, SET_MEM_TABLE and
//! ADD_MEM_REG), which vhost-user-backend maps `MAP_SHARED` without checking
//! the file's size. A page of such a mapping that lies past the end of its
//! file raises SIGBUS (`BUS_ADRERR`) when the CPU touches it: a region
//! declared larger than its file, or a file truncated later. (The kernel's own
//! accesses, io_uring DMA, get EFAULT instead.) pinblk's CPU touches guest
//! memory for the rings, the status byte, checksum copies and bounce copies.
//!
//! - [`accept_memory`], on every memory-table change, refuses a region larger
//!   than its file and registers the host-virtual range of every mapped region.
//! - A SIGBUS handler: a fault inside a registered range maps anonymous memory
//!   over the rest of that region (`MAP_FIXED`, from the faulting page on), so
//!   the faulting instruction retries and completes on harmless memory, and
//!   records where the region became lost. A fault anywhere else restores
//!   the previous action (default: terminate), so real bugs still crash.
//! - [`lost`]: whether a request's guest ranges touch lost memory; the worker
//!   asks after its CPU accesses and fails such a request with IOERR.
//!
//! The handler reads only a fixed array of atomics (async-signal-safe) and
//! calls only mmap(2) and sigaction(2).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};

use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

/// Guest memory as vhost-user-backend maps it (no dirty bitmap).
/// Guest memory as pinblk maps it: the same type as `guest::GuestMem` (a
/// peer room on this level, so not imported).
type Mem = GuestMemoryMmap<Log>;
type Log = vhost_user_backend::bitmap::BitmapMmapRegion;

/// Regions watched at once: vhost-user-backend's 509 memory slots, twice
/// (a new table's regions and an old table's still held by requests in flight).
pub const MAX_WATCHED_REGIONS: usize = 1024;

/// One watched region, written by [`accept_memory`] (under [`TRACKER`]) and
/// read by the signal handler. `state` is a sequence lock: bit 0 set = live,
/// the rest a generation bumped at every change.
struct Slot {
    state: AtomicU64,
    /// Host-virtual address of the region's first byte.
    start: AtomicUsize,
    /// Host-virtual address one past its last byte.
    end: AtomicUsize,
    /// Mapping granule in bytes (the page size; the huge page size on hugetlbfs).
    granule: AtomicUsize,
    /// Lowest host-virtual address replaced by anonymous memory after a
    /// SIGBUS (`usize::MAX`: none); everything from it to `end` is lost.
    lost_from: AtomicUsize,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            granule: AtomicUsize::new(4096),
            lost_from: AtomicUsize::new(usize::MAX),
        }
    }

    /// `(start, end, granule, lost_from)` if live, read consistently.
    fn read(&self) -> Option<(usize, usize, usize, usize)> {
        let s1 = self.state.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            return None;
        }
        let v = (
            self.start.load(Ordering::Relaxed),
            self.end.load(Ordering::Relaxed),
            self.granule.load(Ordering::Relaxed),
            self.lost_from.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        (self.state.load(Ordering::Relaxed) == s1).then_some(v)
    }
}

static SLOTS: [Slot; MAX_WATCHED_REGIONS] = [const { Slot::new() }; MAX_WATCHED_REGIONS];
/// SIGBUS faults absorbed since start.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The SIGBUS action found at installation, restored for faults not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

/// Identity of a mapped region: host range, and the file behind it (so that
/// a new mapping at a reused address is not taken for the old one).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    start: usize,
    end: usize,
    dev: u64,
    ino: u64,
    /// A mapping of pinblk's own ([`watch_mapping`]), not guest memory:
    /// kept until its [`WatchedMapping`] is dropped.
    own: bool,
}

/// The non-signal side: every memory snapshot seen (weakly: a region stays
/// mapped while any snapshot holding it lives) and which slot holds which key.
struct Tracker {
    snapshots: Vec<Weak<Mem>>,
    keys: Vec<Option<Key>>,
}

static TRACKER: Mutex<Tracker> = Mutex::new(Tracker {
    snapshots: Vec::new(),
    keys: Vec::new(),
});

/// Checks and watches the guest memory vhost-user-backend has just installed
/// (call from `VhostUserBackend::update_memory`, after every SET_MEM_TABLE,
/// ADD_MEM_REG and REM_MEM_REG).
///
/// Every region backed by a regular file must fit in it: `mmap_offset +
/// memory_size <= file size` (bytes). A region that does not is taken out of
/// `mem` again (so nothing touches it; the rest of the table stays), and the
/// refusal is returned, which vhost-user-backend turns into a failed
/// REPLY_ACK and the end of the connection; pinblk then serves the next one.
/// Every region still mapped is registered with the SIGBUS handler (installed
/// on first use), and regions no snapshot maps any more are forgotten.
///
/// # Errors
/// `ErrorKind::InvalidInput` naming each region larger than its file.
pub fn accept_memory(mem: &GuestMemoryAtomic<Mem>) -> io::Result<()> {
    install();
    let snapshot = mem.memory().into_inner();
    watch(Some(&snapshot));
    let bad: Vec<(GuestAddress, u64, String)> = snapshot
        .iter()
        .filter_map(|r| region_fits(r).err().map(|e| (r.start_addr(), r.len(), e)))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let mut kept: Option<Mem> = None;
    for (base, len, _) in &bad {
        let from = kept.as_ref().unwrap_or(&snapshot);
        if let Ok((m, _)) = from.remove_region(*base, *len) {
            kept = Some(m);
        }
    }
    if let Some(m) = kept {
        mem.lock().unwrap_or_else(|p| p.into_inner()).replace(m);
        watch(Some(&mem.memory().into_inner()));
    }
    let why: Vec<String> = bad.into_iter().map(|(_, _, e)| e).collect();
    let msg = format!("memory table refused: {}", why.join("; "));
    log::error!("{msg}");
    Err(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

/// Whether the region's file (a regular file) holds every byte it maps.
fn region_fits(r: &GuestRegionMmap<Log>) -> Result<(), String> {
    let Some(fo) = r.file_offset() else {
        return Ok(());
    };
    let what = |detail: String| {
        format!(
            "region at guest-physical {:#x} size {:#x} (mmap_offset {:#x}): {detail}",
            r.start_addr().0,
            r.len(),
            fo.start()
        )
    };
    let meta = fo
        .file()
        .metadata()
        .map_err(|e| what(format!("cannot stat its file: {e}")))?;
    if !meta.is_file() {
        // Devices and the like: no size to check; the handler still watches it.
        return Ok(());
    }
    match fo.start().checked_add(r.len()) {
        Some(end) if end <= meta.len() => Ok(()),
        _ => Err(what(format!(
            "larger than its file of {} bytes (a CPU access past the end would raise SIGBUS)",
            meta.len()
        ))),
    }
}

/// Forgets the regions no memory snapshot maps any more. [`accept_memory`]
/// does it at every memory-table change; call it also when a connection's
/// memory is gone (so that a later mapping at a reused address is not taken
/// for guest memory by the SIGBUS handler).
pub fn forget_unmapped() {
    watch(None);
}

/// Registers the regions of `snapshot` and forgets regions no live snapshot maps.
fn watch(snapshot: Option<&Arc<Mem>>) {
    let mut t = TRACKER.lock().unwrap_or_else(|p| p.into_inner());
    if t.keys.is_empty() {
        t.keys = vec![None; MAX_WATCHED_REGIONS];
    }
    if let Some(s) = snapshot {
        t.snapshots.push(Arc::downgrade(s));
    }
    let live: Vec<Arc<Mem>> = t.snapshots.iter().filter_map(Weak::upgrade).collect();
    t.snapshots = live.iter().map(Arc::downgrade).collect();
    let mut mapped: Vec<(Key, usize)> = Vec::new();
    for m in &live {
        for r in m.iter() {
            let start = r.as_ptr() as usize;
            let (dev, ino, granule) = file_identity(r);
            let key = Key {
                start,
                end: start + r.len() as usize,
                dev,
                ino,
                own: false,
            };
            if !mapped.iter().any(|(k, _)| *k == key) {
                mapped.push((key, granule));
            }
        }
    }
    for (i, slot) in SLOTS.iter().enumerate() {
        if let Some(k) = t.keys[i] {
            if !k.own && !mapped.iter().any(|(m, _)| *m == k) {
                let s = slot.state.load(Ordering::Relaxed);
                slot.state.store((s | 1) + 1, Ordering::Release);
                t.keys[i] = None;
            }
        }
    }
    for (key, granule) in mapped {
        if t.keys.contains(&Some(key)) {
            continue;
        }
        if fill_slot(&mut t, key, granule).is_none() {
            log::warn!(
                "more than {MAX_WATCHED_REGIONS} guest memory regions mapped: \
                 a SIGBUS in {:#x}..{:#x} will not be caught",
                key.start,
                key.end
            );
        }
    }
}

/// Puts `key` into a free slot (live from then on); its index, or `None`
/// when every slot is taken.
fn fill_slot(t: &mut Tracker, key: Key, granule: usize) -> Option<usize> {
    if t.keys.is_empty() {
        t.keys = vec![None; MAX_WATCHED_REGIONS];
    }
    let i = t.keys.iter().position(Option::is_none)?;
    let slot = &SLOTS[i];
    let s = slot.state.load(Ordering::Relaxed);
    // Not live (even) while the fields change; then live (odd).
    slot.state.store((s | 1) + 1, Ordering::Release);
    fence(Ordering::Release);
    slot.start.store(key.start, Ordering::Relaxed);
    slot.end.store(key.end, Ordering::Relaxed);
    slot.granule.store(granule, Ordering::Relaxed);
    slot.lost_from.store(usize::MAX, Ordering::Relaxed);
    slot.state.store((s | 1) + 2, Ordering::Release);
    t.keys[i] = Some(key);
    Some(i)
}

/// A mapping of pinblk's own, not guest memory, watched by the SIGBUS
/// handler: the image mapping of `--aio mmap` (`storage::mapped`), whose
/// file can be truncated under it, or whose filesystem (tmpfs) can fail to
/// allocate a page for a hole. A fault in it is absorbed like one in guest
/// memory: anonymous memory is mapped from the faulting page to the end,
/// the access completes on it, and [`WatchedMapping::faulted`] says so; the
/// owner must then stop using the mapping (its contents from that page on
/// are no longer the file's) and redo the access another way. Dropping it
/// stops the watch; drop it before unmapping.
#[derive(Debug)]
pub struct WatchedMapping {
    slot: usize,
    start: usize,
}

/// Watches the host-virtual range `[start, start + len)` (a mapping the
/// caller owns and keeps mapped while the returned value lives) with the
/// SIGBUS handler, installing it on first use. Page granule: the system's.
/// `None` when every watch slot is taken (a fault in it then kills the
/// process, as without the handler).
pub fn watch_mapping(start: usize, len: usize) -> Option<WatchedMapping> {
    install();
    // SAFETY: sysconf only reads a system constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let key = Key {
        start,
        end: start.checked_add(len)?,
        dev: 0,
        ino: 0,
        own: true,
    };
    let mut t = TRACKER.lock().unwrap_or_else(|p| p.into_inner());
    fill_slot(&mut t, key, page).map(|slot| WatchedMapping { slot, start })
}

impl WatchedMapping {
    /// Whether a SIGBUS was absorbed in this mapping since it was watched.
    /// One atomic load while no SIGBUS ever happened in the process.
    pub fn faulted(&self) -> bool {
        if FAULTS.load(Ordering::Acquire) == 0 {
            return false;
        }
        SLOTS[self.slot]
            .read()
            .is_some_and(|(s, _, _, lost)| s == self.start && lost != usize::MAX)
    }
}

impl Drop for WatchedMapping {
    fn drop(&mut self) {
        let mut t = TRACKER.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &SLOTS[self.slot];
        let s = slot.state.load(Ordering::Relaxed);
        slot.state.store((s | 1) + 1, Ordering::Release);
        t.keys[self.slot] = None;
    }
}

/// The (device, inode) of a region's file (0, 0 if anonymous) and its
/// mapping granule in bytes.
fn file_identity(r: &GuestRegionMmap<Log>) -> (u64, u64, usize) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: sysconf only reads a system constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let Some(fo) = r.file_offset() else {
        return (0, 0, page);
    };
    let (dev, ino) = fo
        .file()
        .metadata()
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((0, 0));
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `fs`, a valid statfs we own; the fd is open
    // (owned by the region's FileOffset).
    let hugetlb = unsafe { libc::fstatfs(fo.file().as_raw_fd(), &mut fs) } == 0
        && fs.f_type as u64 == libc::HUGETLBFS_MAGIC as u64;
    let granule = if hugetlb {
        usize::try_from(fs.f_bsize).unwrap_or(page).max(page)
    } else {
        page
    };
    (dev, ino, granule)
}

/// Whether any byte of the guest-physical ranges `(address, length in
/// bytes)` of `mem` lies in memory replaced after a SIGBUS. Ranges outside
/// `mem` are not lost (other checks refuse them). One atomic load while no
/// SIGBUS ever happened; after one, one scan of the watched regions per
/// region of `mem` the ranges touch.
#[inline]
pub fn lost(mem: &Mem, ranges: impl IntoIterator<Item = (u64, u64)>) -> bool {
    // Inline, so that a caller's iterator of ranges is not even built on the
    // path taken on every request: no SIGBUS ever happened.
    if FAULTS.load(Ordering::Acquire) == 0 {
        return false;
    }
    lost_after_a_fault(mem, ranges)
}

/// [`lost`] once a SIGBUS happened.
#[cold]
fn lost_after_a_fault(mem: &Mem, ranges: impl IntoIterator<Item = (u64, u64)>) -> bool {
    // (host start of a region of `mem`, host address from which it is lost)
    let mut seen: Vec<(usize, usize)> = Vec::new();
    for (gpa, len) in ranges {
        let end = gpa.saturating_add(len);
        let mut a = gpa;
        while a < end {
            let Some(r) = mem.find_region(GuestAddress(a)) else {
                break;
            };
            let base = r.as_ptr() as usize;
            let lost_from = match seen.iter().find(|(b, _)| *b == base) {
                Some(&(_, l)) => l,
                None => {
                    let l = lost_from(base);
                    seen.push((base, l));
                    l
                }
            };
            let off = a - r.start_addr().0;
            let n = (end - a).min(r.len() - off);
            if lost_from < (base + off as usize).saturating_add(n as usize) {
                return true;
            }
            a += n;
        }
    }
    false
}

/// The host-virtual address from which the watched region starting at
/// `base` is lost (`usize::MAX`: nothing lost, or not watched).
fn lost_from(base: usize) -> usize {
    SLOTS
        .iter()
        .filter_map(Slot::read)
        .find(|&(s, _, _, _)| s == base)
        .map_or(usize::MAX, |(_, _, _, l)| l)
}

/// SIGBUS faults on guest memory absorbed since start (for logs).
#[inline]
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// Installs the SIGBUS handler once per process.
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value of this C struct.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: queries the current action into `old`, which we own.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } == 0 {
            let _ = PREVIOUS.set(old);
        }
        // SAFETY: as above.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `sa.sa_mask` is ours; sigemptyset only initializes it.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs a handler that is async-signal-safe (see
        // `on_sigbus`); `sa` is fully initialized.
        if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
            log::warn!(
                "cannot install the SIGBUS handler: {}; a truncated guest memory file will kill pinblk",
                io::Error::last_os_error()
            );
        }
    });
}

/// The SIGBUS handler. Async-signal-safe: reads the slot atomics, calls
/// mmap(2) or sigaction(2), saves and restores errno.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; __errno_location returns this thread's.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO; for SIGBUS
    // si_addr is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code != libc::BUS_ADRERR || !replace(addr) {
        // Not guest memory past the end of its file: the previous action
        // (default: terminate with a core) takes the fault when it repeats.
        let dfl = {
            // SAFETY: as in `install`.
            let mut d: libc::sigaction = unsafe { std::mem::zeroed() };
            d.sa_sigaction = libc::SIG_DFL;
            d
        };
        let prev = PREVIOUS.get().unwrap_or(&dfl);
        // SAFETY: sigaction is async-signal-safe; `prev` is a valid action.
        unsafe { libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut()) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Maps anonymous memory over the registered region holding `addr`, from
/// the granule of `addr` to the region's end. `false` if `addr` is in no
/// registered region or mmap fails.
fn replace(addr: usize) -> bool {
    for slot in &SLOTS {
        let Some((start, end, granule, _)) = slot.read() else {
            continue;
        };
        if addr < start || addr >= end {
            continue;
        }
        let page = (addr & !(granule - 1)).max(start);
        // SAFETY: [page, end) lies inside a guest memory mapping that is
        // still mapped (a slot is freed only once no snapshot maps it), or
        // inside an image mapping of `--aio mmap` whose WatchedMapping still
        // lives (it is dropped before the munmap), so MAP_FIXED replaces
        // only those, never other memory of pinblk's own. No Rust reference
        // points into either (guest memory is accessed through volatile
        // copies and atomics, the image mapping through raw-pointer copies),
        // so changing what backs it breaks no aliasing rule. From `page` on
        // the region counts as lost (`lost_from`): past the end of the file
        // (truncation) nothing is there to lose, and in any other case
        // (hugetlbfs out of huge pages, tmpfs full) every request touching
        // guest memory there fails, and the image mapping's owner stops
        // using it and redoes the access through the file, so no data goes
        // missing silently. mmap is a plain system call, safe in a signal
        // handler.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                end - page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        slot.lost_from.fetch_min(page, Ordering::AcqRel);
        FAULTS.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    false
}

/// Unit tests of the guest memory checks and the SIGBUS handler.
#[cfg(test)]
mod tests;
