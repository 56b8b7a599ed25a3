//! The process's signals, and systemd's notification protocol.
//!
//! - SIGTERM: graceful stop; SIGINT: fast stop; SIGQUIT: hand the listening sockets to a
//!   process started with `serve --upgrade` (Pingora's hand-over).
//! - SIGUSR2: upgrade in place, as one step: start the binary now on disk with the same
//!   arguments plus `--upgrade`, then hand over to it as SIGQUIT does. The new process is a child
//!   of this one, so it stays in the service's cgroup, and tells systemd (`MAINPID=`) that it is
//!   the service's main process now (the unit needs `Type=notify` and `NotifyAccess=all`).
//! - SIGHUP is the reload ([`crate::reload`]), watched elsewhere.
//!
//! [`notify`] speaks systemd's protocol (sd_notify(3)): a datagram to `$NOTIFY_SOCKET`. Hand
//! written: the message is one line and the socket one `send_to`; a crate would add a C library
//! or unsafe code for it.

use std::path::PathBuf;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

/// Sends `message` (e.g. `READY=1`) to systemd when it is watching (`NOTIFY_SOCKET` set);
/// quietly does nothing otherwise. Never blocks.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux): the name after '@'.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)
        } else {
            socket.send_to(message.as_bytes(), PathBuf::from(&path))
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// How this process was started: to start its successor the same way.
#[derive(Debug, Clone)]
pub struct Restart {
    /// The arguments after the program name, without `--upgrade`.
    pub args: Vec<std::ffi::OsString>,
}

impl Restart {
    /// This process's own arguments.
    pub fn from_env() -> Self {
        Self {
            args: std::env::args_os()
                .skip(1)
                .filter(|a| a != "--upgrade")
                .collect(),
        }
    }

    /// Starts the binary now at this process's path with the same arguments, `--upgrade` added
    /// after `serve`; its PID.
    fn spawn_successor(&self) -> std::io::Result<u32> {
        let exe = std::env::current_exe()?;
        // The kernel marks a replaced binary's path " (deleted)": run the new file there.
        let exe = exe
            .to_str()
            .and_then(|p| p.strip_suffix(" (deleted)"))
            .map_or(exe.clone(), PathBuf::from);
        let mut args = self.args.clone();
        let at = args.iter().position(|a| a == "serve").map_or(0, |i| i + 1);
        args.insert(at, "--upgrade".into());
        std::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map(|child| child.id())
    }
}

/// Pingora's shutdown signals, and SIGUSR2 for the upgrade in place.
#[derive(Debug)]
pub struct Signals {
    /// How to start the successor on SIGUSR2.
    pub restart: Restart,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::user_defined2()),
        ) else {
            tracing::error!("cannot watch the shutdown signals; stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = usr2.recv() => match self.restart.spawn_successor() {
                    Ok(pid) => {
                        tracing::info!(pid, "upgrade: started the new process; handing the listening sockets over");
                        // The successor waits on the upgrade socket; the hand-over retries
                        // until it listens there.
                        return ShutdownSignal::GracefulUpgrade;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "upgrade: cannot start the new process; still serving");
                    }
                },
            }
        }
    }
}
