//! The listening side: one Unix socket (mode 0600), one vhost-user daemon per
//! connection, served one after another for as long as pinblk runs. SIGINT and
//! SIGTERM stop it after in-flight requests complete; SIGUSR1 logs counters.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::Device;
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

/// Shared stop state between the signal thread and the accept loop.
#[derive(Default)]
struct Control {
    stopping: AtomicBool,
    current: Mutex<Option<ShutdownHandle>>,
}

/// Serves `dev` on the Unix socket `socket` until SIGINT/SIGTERM, or until
/// `max_connections` connections were served if given.
///
/// # Errors
/// [`ServeError`] if the socket cannot be created or a connection cannot be set up.
pub fn serve(
    dev: Arc<Device>,
    socket: &Path,
    max_connections: Option<u64>,
) -> Result<(), ServeError> {
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
    let mut listener = listener.map_err(|e| listen_err(std::io::Error::other(e.to_string())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    std::fs::rename(&tmp, socket).map_err(listen_err)?;

    let control = Arc::new(Control::default());
    spawn_signal_thread(control.clone(), Arc::downgrade(&dev), socket.to_path_buf());

    let mut served = 0u64;
    while !control.stopping.load(Ordering::Acquire) {
        // The last connection's guest memory is unmapped by now.
        crate::sigbus::forget_unmapped();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            BlkBackend::new(dev.clone(), mem.clone())
                .map_err(|e| ServeError::Setup(e.to_string()))?,
        );
        let mut daemon = VhostUserDaemon::new("pinblk".into(), backend.clone(), mem)
            .map_err(|e| ServeError::Setup(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (i, h) in handlers.iter().enumerate() {
            let fd = {
                use std::os::fd::AsRawFd;
                backend.worker(i).completion_fd().as_raw_fd()
            };
            h.register_listener(fd, EventSet::IN, backend.completion_event_id())
                .map_err(|e| {
                    ServeError::Setup(format!("cannot register completion eventfd: {e}"))
                })?;
        }
        log::info!("waiting for a vhost-user frontend on {}", socket.display());
        if let Err(e) = daemon.start(&mut listener) {
            log::error!("accepting a connection failed: {e}");
            handlers.iter().for_each(|h| h.send_exit_event());
            continue;
        }
        *control.current.lock().unwrap() = daemon.shutdown_handle();
        if control.stopping.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        log::info!("frontend connected");
        match daemon.wait() {
            Ok(()) => log::info!("frontend disconnected"),
            Err(e) => log::info!("frontend connection ended: {e}"),
        }
        control.current.lock().unwrap().take();
        backend.drain_all();
        handlers.iter().for_each(|h| h.send_exit_event());
        drop(handlers);
        drop(daemon);
        served += 1;
        log::info!("counters: {}", dev.counters_json());
        if max_connections.is_some_and(|m| served >= m) {
            break;
        }
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
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
                control.stopping.store(true, Ordering::Release);
                match control.current.lock().unwrap().as_ref() {
                    Some(h) => h.shutdown(),
                    None => {
                        // Waiting in accept(): wake it with a connection of
                        // our own, so that the serve loop ends and the normal
                        // shutdown (checksum store closed cleanly) runs.
                        let _ = std::os::unix::net::UnixStream::connect(&socket);
                    }
                }
            }
        })
        .expect("spawning the signal thread");
}
