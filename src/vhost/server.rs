//! The listening side: one Unix socket (mode 0600), one vhost-user daemon per
//! connection, up to [`MAX_CONNECTIONS`] served side by side (a migration's
//! source and destination on one host) for as long as pinblk runs. SIGINT and
//! SIGTERM stop every connection after in-flight requests complete; SIGUSR1
//! logs counters.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::{Device, MAX_CONNECTIONS};
use crate::report::{Event, MigrationEvent};
use crate::vhost::backend::BlkBackend;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket cannot be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A connection could not be set up.
    #[error("cannot set up vhost-user connection: {0}")]
    Setup(String),
}

/// Shared state of the accept loop, the connection threads and the signal
/// thread.
#[derive(Default)]
struct Control {
    stopping: AtomicBool,
    /// The connections being served: number, lane, shutdown handle.
    conns: Mutex<Vec<Conn>>,
    /// Signalled when a connection ends (its lane is free again) or on stop.
    lane_freed: Condvar,
}

/// One connection being served.
struct Conn {
    id: u64,
    lane: u16,
    shutdown: Option<ShutdownHandle>,
    /// The newest connection accepted while this one was served: the
    /// destination, if this one turns out to be a migration's source.
    successor: Option<u64>,
}

impl Control {
    fn conns(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free lane for the next connection, waiting while
    /// [`MAX_CONNECTIONS`] are served; `None` once stopping.
    fn free_lane(&self) -> Option<u16> {
        let mut conns = self.conns();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            if let Some(lane) = (0..MAX_CONNECTIONS).find(|l| conns.iter().all(|c| c.lane != *l)) {
                return Some(lane);
            }
            conns = self
                .lane_freed
                .wait(conns)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Shuts every connection down (SIGINT/SIGTERM).
    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for c in self.conns().iter() {
            if let Some(h) = &c.shutdown {
                h.shutdown();
            }
        }
        self.lane_freed.notify_all();
    }
}

/// Serves `dev` on the Unix socket `socket` until SIGINT/SIGTERM, or until
/// `max_connections` connections were accepted and have ended, if given.
///
/// Connections are served side by side, at most [`MAX_CONNECTIONS`] at
/// once (a further one waits in the listen backlog until one ends): a
/// migration's destination QEMU connects to the same socket while the
/// source is still connected (docs/DESIGN.md §13). Each connection has its
/// own vhost-user daemon, frontend thread and one thread per virtqueue, all
/// over the one shared `dev`. When a connection ends, its queues are drained
/// (every popped request completes, its pins released); a connection that
/// handed its guest over (a migration source) is then reported with a
/// `migration` event naming the connection that took it over.
///
/// # Errors
/// [`ServeError`] if the socket cannot be created or a connection cannot be set up.
pub fn serve(
    dev: Arc<Device>,
    socket: &Path,
    max_connections: Option<u64>,
) -> Result<(), ServeError> {
    let mut listener = listen(socket)?;
    let control = Arc::new(Control::default());
    spawn_signal_thread(control.clone(), Arc::downgrade(&dev), socket.to_path_buf());

    let mut accepted = 0u64;
    let mut threads = Vec::new();
    let mut result = Ok(());
    while max_connections.is_none_or(|m| accepted < m) {
        let Some(lane) = control.free_lane() else {
            break;
        };
        // The memory of connections that ended is unmapped by now.
        crate::sigbus::forget_unmapped();
        let id = accepted + 1;
        let conn = match Connection::new(&dev, id, lane) {
            Ok(c) => c,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        log::info!("waiting for a vhost-user frontend on {}", socket.display());
        let Some(conn) = conn.accept(&mut listener) else {
            continue;
        };
        accepted += 1;
        let others: Vec<u64> = {
            let mut conns = control.conns();
            let others = conns.iter().map(|c| c.id).collect();
            for c in conns.iter_mut() {
                c.successor = Some(id);
            }
            conns.push(Conn {
                id,
                lane,
                shutdown: conn.daemon.shutdown_handle(),
                successor: None,
            });
            others
        };
        if control.stopping.load(Ordering::Acquire) {
            // The signal thread's own wake-up connection, or one that came
            // in as pinblk stops.
            conn.daemon.request_shutdown();
        }
        if others.is_empty() {
            log::info!("frontend connected (connection {id})");
        } else {
            log::info!(
                "frontend connected (connection {id}) while connection(s) {others:?} are served \
                 (a migration's destination on this host?)"
            );
        }
        let (d, c) = (dev.clone(), control.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("pinblk-conn-{id}"))
            .spawn(move || conn.serve(&d, &c));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                result = Err(ServeError::Setup(format!(
                    "cannot spawn a connection thread: {e}"
                )));
                control.stop();
                break;
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(socket);
    result
}

/// The socket at `socket`, mode 0600, listening before its path appears.
fn listen(socket: &Path) -> Result<Listener, ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    // The socket gives full access to the image: create it 0600. Bind under
    // a temporary name and rename it into place, so that the path appears
    // only once the socket is listening (no ECONNREFUSED window).
    let tmp = socket.with_file_name(format!(
        ".{}.{}",
        socket
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    // SAFETY: umask(2) only changes the process file-mode mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = Listener::new(&tmp, true);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|e| listen_err(std::io::Error::other(e.to_string())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    std::fs::rename(&tmp, socket).map_err(listen_err)?;
    Ok(listener)
}

/// One connection: its backend, daemon and queue threads' epoll handlers.
struct Connection {
    id: u64,
    backend: Arc<BlkBackend>,
    daemon: VhostUserDaemon<Arc<BlkBackend>>,
    handlers: Vec<Arc<VringEpollHandler<Arc<BlkBackend>>>>,
}

impl Connection {
    /// A backend and daemon for connection `id` in `lane`, not yet accepted.
    fn new(dev: &Arc<Device>, id: u64, lane: u16) -> Result<Connection, ServeError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            BlkBackend::new(dev.clone(), mem.clone(), id, lane)
                .map_err(|e| ServeError::Setup(e.to_string()))?,
        );
        let daemon = VhostUserDaemon::new("pinblk".into(), backend.clone(), mem)
            .map_err(|e| ServeError::Setup(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (i, h) in handlers.iter().enumerate() {
            let fd = backend.worker(i).completion_fd().as_raw_fd();
            h.register_listener(fd, EventSet::IN, backend.completion_event_id())
                .map_err(|e| {
                    ServeError::Setup(format!("cannot register completion eventfd: {e}"))
                })?;
        }
        Ok(Connection {
            id,
            backend,
            daemon,
            handlers,
        })
    }

    /// Waits for a frontend; `None` (logged, torn down) if accepting failed.
    fn accept(mut self, listener: &mut Listener) -> Option<Connection> {
        match self.daemon.start(listener) {
            Ok(()) => Some(self),
            Err(e) => {
                log::error!("accepting a connection failed: {e}");
                self.handlers.iter().for_each(|h| h.send_exit_event());
                None
            }
        }
    }

    /// Serves the connection until it ends, drains its queues, reports a
    /// migration boundary if it handed its guest over, and frees its lane.
    fn serve(mut self, dev: &Device, control: &Control) {
        let id = self.id;
        match self.daemon.wait() {
            Ok(()) => log::info!("frontend disconnected (connection {id})"),
            Err(e) => log::info!("frontend connection {id} ended: {e}"),
        }
        if let Some(c) = control.conns().iter_mut().find(|c| c.id == id) {
            c.shutdown = None;
        }
        self.backend.drain_all();
        self.handlers.iter().for_each(|h| h.send_exit_event());
        drop(self.handlers);
        drop(self.daemon);
        if self.backend.handed_over() {
            // On one host the destination connected while the source was
            // served: the newest such connection took the guest over (it
            // may already have ended too, e.g. a guest that powered off).
            let to = control
                .conns()
                .iter()
                .find(|c| c.id == id)
                .and_then(|c| c.successor);
            migration_boundary(dev, id, to, self.backend.drained_at_stop());
        }
        drop(self.backend);
        let mut conns = control.conns();
        conns.retain(|c| c.id != id);
        control.lane_freed.notify_all();
        drop(conns);
        log::info!("counters: {}", dev.counters_json());
    }
}

/// Reports that connection `from` handed its guest over to connection `to`
/// (on this host) or to a backend elsewhere (`None`): a `migration` event
/// and a log line.
fn migration_boundary(dev: &Device, from: u64, to: Option<u64>, drained: u64) {
    let e = Event::new(MigrationEvent::new(from, to, drained));
    if let Err(err) = dev.report().emit(&e) {
        log::error!("cannot write report event: {err}");
    }
}

fn spawn_signal_thread(control: Arc<Control>, dev: std::sync::Weak<Device>, socket: PathBuf) {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1]) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot install signal handlers: {e}");
            return;
        }
    };
    std::thread::Builder::new()
        .name("pinblk-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGUSR1 {
                    if let Some(dev) = dev.upgrade() {
                        log::info!("counters: {}", dev.counters_json());
                    }
                    continue;
                }
                log::info!("signal {sig}: stopping after in-flight requests complete");
                control.stop();
                // Waiting in accept(): wake it with a connection of our own,
                // so that the serve loop ends and the normal shutdown
                // (checksum store closed cleanly) runs.
                let _ = std::os::unix::net::UnixStream::connect(&socket);
            }
        })
        .expect("spawning the signal thread");
}
