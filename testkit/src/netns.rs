//! A network namespace for a test: its own loopback and one veth pair to this one, so a
//! process inside (a pod server behind NAT, its agent) can reach an address of ours while
//! nothing of ours can reach its loopback. Needs root and iproute2 (`ip`); removed on drop.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// A namespace and the two ends of its link.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns exec <name> ...`).
    pub name: String,
    /// Our end's address (in this namespace).
    pub outside: Ipv4Addr,
    /// Its end's address (inside).
    pub inside: Ipv4Addr,
    veth: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Makes one (named after `tag` and this process, on a /30 of 10.213.0.0/16 chosen by the
    /// process id), or says why it cannot (not root, no `ip`).
    ///
    /// # Errors
    /// What `ip` said.
    pub fn create(tag: &str) -> Result<Self, String> {
        let pid = std::process::id();
        let name = format!("pinacle-{tag}-{pid}");
        let veth = format!("pv{}", pid % 1_000_000_000);
        let (third, fourth) = (((pid >> 6) & 0xff) as u8, ((pid & 0x3f) * 4) as u8);
        let outside = Ipv4Addr::new(10, 213, third, fourth + 1);
        let inside = Ipv4Addr::new(10, 213, third, fourth + 2);
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            outside,
            inside,
            veth,
        };
        let peer = format!("{}i", ns.veth);
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{outside}/30"), "dev", &ns.veth])?;
        ip(&["link", "set", &ns.veth, "up"])?;
        let inside_cidr = format!("{inside}/30");
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &inside_cidr, "dev", &peer],
            vec!["link", "set", &peer, "up"],
        ] {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend(args);
            ip(&all)?;
        }
        Ok(ns)
    }

    /// `program`, to be run inside.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting our end deletes the pair; the namespace goes once nothing runs in it.
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
