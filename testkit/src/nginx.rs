//! A real nginx process for tests, run in the foreground with its own prefix directory and stopped
//! by its PID when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The nginx binary: `$NGINX_BIN`, else `nginx` on PATH, else `/usr/sbin/nginx`.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NGINX_BIN") {
        return bin.into();
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin"])
    {
        let candidate = Path::new(dir).join("nginx");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nginx not found (scripts/test installs it; or set NGINX_BIN)")
}

/// Runs `nginx -t` on a config file; `Err` carries nginx's complaint.
pub fn check(config_path: &Path) -> Result<(), String> {
    let out = Command::new(binary())
        .arg("-t")
        .arg("-q")
        .arg("-c")
        .arg(config_path)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A running nginx.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its working directory (config, logs, temp files).
    pub dir: PathBuf,
}

impl Nginx {
    /// Writes `config` (which must use `dir()`-relative runtime paths) and starts nginx in the
    /// foreground; returns once it accepts connections on `addr`.
    pub async fn start(dir: PathBuf, config: &str, addr: SocketAddr) -> Self {
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        if let Err(e) = check(&path) {
            panic!("nginx -t rejected the config: {e}\n{config}");
        }
        let child = Command::new(binary())
            .arg("-g")
            .arg("daemon off;")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        crate::wait_for_port(addr).await;
        Self { child, addr, dir }
    }

    /// A fresh directory for an nginx instance, with its temp subdirectory.
    pub fn make_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pinacle-nginx-{tag}-{}-{}",
            std::process::id(),
            crate::reserve_port()
        ));
        std::fs::create_dir_all(dir.join("temp")).unwrap();
        dir
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Ends only the process this test started, by its PID. SIGTERM (not SIGKILL) so that the
        // master takes its workers down with it.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
