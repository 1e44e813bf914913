//! Linux network namespaces for `isthmusctl up` and the tests: each network
//! of a topology becomes a namespace, joined to the others only through a
//! "wan" namespace that bridges the gateways' addresses. Pods get /32
//! addresses on their network's loopback, which no other namespace routes
//! to, so east's workloads can reach west only through west's gateway.
//!
//! The primary lives in the wan namespace, on the bridge itself. Nothing is
//! routed to or from the host's own namespace: local tools reach the primary
//! through its Unix API socket, and tests enter a namespace to connect.
//!
//! Addresses come from the documentation ranges: the wan is 192.0.2.0/24
//! (the primary is .1, network i's gateway .(10+i)), and network i's pods
//! live in 198.51.100.0/24 or 203.0.113.0/24.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;

use anyhow::{Context, bail};

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// True when this process may create network namespaces.
pub fn available() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

pub const PRIMARY_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The address of primary replica `i` (0 is [`PRIMARY_ADDR`]).
pub fn primary_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1 + i as u8)
}

pub fn gateway_addr(network_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + network_index as u8)
}

/// Pod address `host` (2..250) of network `i` (0 or 1).
pub fn pod_addr(network_index: usize, host: u8) -> Ipv4Addr {
    match network_index {
        0 => Ipv4Addr::new(198, 51, 100, host),
        _ => Ipv4Addr::new(203, 0, 113, host),
    }
}

/// What was created, so it can be removed again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub prefix: String,
    pub wan: String,
    /// Network name → namespace name.
    pub networks: Vec<(String, String)>,
}

impl Layout {
    pub fn namespace_of(&self, network: &str) -> Option<&str> {
        self.networks
            .iter()
            .find(|(n, _)| n == network)
            .map(|(_, ns)| ns.as_str())
    }

    /// Builds the namespaces, the wan bridge and the links.
    pub fn create(prefix: &str, networks: &[String]) -> anyhow::Result<Self> {
        if networks.len() > 2 {
            bail!(
                "the namespace layout supports at most 2 networks (documentation address ranges)"
            );
        }
        let layout = Layout {
            prefix: prefix.to_string(),
            wan: format!("{prefix}-wan"),
            networks: networks
                .iter()
                .map(|n| (n.clone(), format!("{prefix}-{n}")))
                .collect(),
        };
        if let Err(e) = layout.build() {
            layout.destroy();
            return Err(e);
        }
        Ok(layout)
    }

    fn build(&self) -> anyhow::Result<()> {
        let wan = self.wan.as_str();
        ip(&["netns", "add", wan])?;
        ip(&["-n", wan, "link", "set", "lo", "up"])?;
        ip(&["-n", wan, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            wan,
            "addr",
            "add",
            &format!("{PRIMARY_ADDR}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", wan, "link", "set", "br0", "up"])?;
        for (i, (_, ns)) in self.networks.iter().enumerate() {
            let port = format!("n{i}");
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", wan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", wan, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", wan, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", gateway_addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Adds another primary replica's address to the wan bridge.
    pub fn add_wan_addr(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.wan,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "br0",
        ])
    }

    /// Adds a pod address to a network's loopback.
    pub fn add_pod_addr(&self, network: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        let ns = self.namespace_of(network).context("unknown network")?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/32"), "dev", "lo"])
    }

    /// Removes everything; safe to call on a partial layout.
    pub fn destroy(&self) {
        for (_, ns) in &self.networks {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["netns", "del", &self.wan]);
    }
}

/// Network namespaces whose names start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Connects a TCP socket from inside namespace `ns` (or here, if None).
/// The socket stays in the namespace it was created in, so the caller can
/// use it from any thread.
pub async fn connect(
    ns: Option<&str>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let Some(ns) = ns else {
        return Ok(tokio::net::TcpStream::connect(addr).await?);
    };
    let path = format!("/run/netns/{ns}");
    // setns changes the calling thread's namespace, so do it on a thread of
    // our own that ends right after, never on a runtime thread.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> anyhow::Result<std::net::TcpStream> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering namespace {path}"))?;
            let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(result);
    });
    let stream = rx.await.context("namespace connect thread died")??;
    Ok(tokio::net::TcpStream::from_std(stream)?)
}
