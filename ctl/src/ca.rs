//! `isthmusctl ca`: status, root and intermediate rotation, importing a CA.
//!
//! Rotations run in the primary (its leader moves them on, and they survive
//! any crash); these commands request one and then follow it, printing each
//! change of phase and what the phase still waits for. Interrupting the CLI
//! interrupts nothing: run the same command again to follow (or resume) it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use isthmus_api::rest::{CaView, ImportRoot, RotateRoot};
use isthmus_topology::client::PrimaryClient;

use crate::{Conn, Output, now_unix, print};

#[derive(clap::Subcommand)]
pub enum CaCmd {
    /// Roots, each cluster's intermediate, expiries, how many connected
    /// workloads hold certificates under each, and any rotation.
    Status {
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Replace the mesh root in three phases (trust both; re-issue under the
    /// new one; drop the old one), with zero downtime. Run it again to
    /// follow or resume a rotation in progress.
    RotateRoot {
        /// Pause after this phase (1 to 3).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
        until: u8,
        /// Undo a rotation that has not reached phase 3.
        #[arg(long)]
        rollback: bool,
        /// Request only; do not follow the progress.
        #[arg(long)]
        no_wait: bool,
        /// Stop following after this many seconds, saying what the rotation
        /// still waits for (it goes on in the primary).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replace one cluster's intermediate, then revoke the old one once no
    /// workload holds a certificate from it.
    RotateIntermediate {
        cluster: String,
        #[arg(long)]
        no_wait: bool,
        /// Stop following after this many seconds, saying what the rotation
        /// still waits for (it goes on in the primary).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Federate with another mesh's trust domain: its workloads are then
    /// verified against its roots (and only those), given as the SPIFFE
    /// bundle its primary serves at /api/v1/trust-bundle.
    Federate {
        trust_domain: String,
        /// The SPIFFE bundle (JSON); `-` reads stdin.
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop federating with a trust domain.
    Unfederate {
        trust_domain: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Rotate to a CA in Istio's plug-in layout: DIR holds root-cert.pem,
    /// ca-cert.pem, ca-key.pem and optionally cert-chain.pem.
    ImportRoot {
        dir: PathBuf,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
        until: u8,
        #[arg(long)]
        no_wait: bool,
        /// Stop following after this many seconds, saying what the rotation
        /// still waits for (it goes on in the primary).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

fn expires(unix: i64) -> String {
    let left = unix - now_unix() as i64;
    if left < 0 {
        "expired".into()
    } else if left > 2 * 86_400 {
        format!("in {}d", left / 86_400)
    } else {
        format!("in {}h{:02}m", left / 3600, (left % 3600) / 60)
    }
}

/// What a phase does. A rollback swaps the roots: its phase 2 re-issues
/// under the old root again, and its phase 3 drops the new one.
fn phase_name(phase: u8, rolled_back: bool) -> &'static str {
    match (phase, rolled_back) {
        (1, _) => "trust both roots",
        (2, false) => "re-issue under the new root",
        (2, true) => "re-issue under the old root again",
        (3, false) => "drop the old root",
        (3, true) => "drop the new root",
        _ => "finished",
    }
}

/// The rotation's progress in one line: what the phase does, then either
/// what it waits for or that it is paused and how to go on.
fn progress(r: &isthmus_api::rest::RotationView) -> String {
    let (paused, waiting): (Vec<&String>, Vec<&String>) =
        r.waiting_for.iter().partition(|w| w.starts_with("paused"));
    let mut line = format!(
        "phase {}/3 {}{}",
        r.phase,
        phase_name(r.phase, r.rolled_back),
        if r.rolled_back { " (rolling back)" } else { "" }
    );
    if !waiting.is_empty() {
        line += &format!(
            ": waiting for {}",
            waiting
                .iter()
                .map(|w| w.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    } else if let Some(p) = paused.first() {
        line += &format!(": {p}");
    }
    line
}

pub fn table(view: &CaView) -> String {
    let mut s = format!(
        "trust domain {}, bundle sequence {}\n\n{:<14} {:<11} {:<11} {:<8} {:<9} {:<10} SUBJECT\n",
        view.trust_domain,
        view.bundle_sequence,
        "ROOT",
        "EXPIRES",
        "CA EXPIRES",
        "SIGNING",
        "IMPORTED",
        "WORKLOADS"
    );
    for r in &view.roots {
        s += &format!(
            "{:<14} {:<11} {:<11} {:<8} {:<9} {:<10} {}\n",
            short(&r.fingerprint),
            expires(r.not_after_unix),
            expires(r.signer_not_after_unix),
            if r.signing { "yes" } else { "no" },
            if r.imported { "yes" } else { "no" },
            r.workloads,
            r.subject
        );
    }
    for r in view.roots.iter().filter(|r| r.signing) {
        if r.signer_not_after_unix - (now_unix() as i64) < 30 * 86_400 {
            s += &format!(
                "WARNING: the signing CA expires {}; cluster intermediates end with it, so rotate to a new root (`isthmusctl ca rotate-root` or `ca import-root`) before then\n",
                expires(r.signer_not_after_unix)
            );
        }
    }
    if view.workloads_unknown > 0 {
        s += &format!(
            "{} connected workloads hold certificates under no trusted root\n",
            view.workloads_unknown
        );
    }
    s += &format!(
        "\n{:<10} {:<14} {:<14} {:<11} {:<10} {:<12} ROTATION\n",
        "CLUSTER", "INTERMEDIATE", "ROOT", "EXPIRES", "WORKLOADS", "ON REPLACED"
    );
    for c in &view.clusters {
        s += &format!(
            "{:<10} {:<14} {:<14} {:<11} {:<10} {:<12} {}\n",
            c.cluster,
            c.fingerprint.as_deref().map(short).unwrap_or("-"),
            c.root.as_deref().map(short).unwrap_or("-"),
            c.not_after_unix.map(expires).unwrap_or_else(|| "-".into()),
            c.workloads,
            c.workloads_on_replaced,
            c.rotation.as_deref().unwrap_or("-"),
        );
    }
    for f in &view.federated {
        s += &format!(
            "\nfederated with {} ({} roots: {})",
            f.trust_domain,
            f.roots.len(),
            f.roots
                .iter()
                .map(|r| short(r))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !view.federated.is_empty() {
        s += "\n";
    }
    if let Some(r) = &view.rotation {
        s += &if r.phase >= 4 {
            format!(
                "\nlast root rotation {} -> {}{}: finished\n",
                short(&r.from),
                short(&r.to),
                if r.rolled_back { " (rolled back)" } else { "" },
            )
        } else {
            format!(
                "\nroot rotation {} -> {}{}: phase {}/3, {} (until phase {})\n",
                short(&r.from),
                short(&r.to),
                if r.rolled_back { " (rolling back)" } else { "" },
                r.phase,
                phase_name(r.phase, r.rolled_back),
                r.until
            )
        };
        for w in &r.waiting_for {
            if w.starts_with("paused") {
                s += &format!("  {w}\n");
            } else {
                s += &format!("  waiting for {w}\n");
            }
        }
    }
    s
}

/// Reconnects as the rotation moves the primary to the new root: with a
/// token (no CA file), the new root's fingerprint, learned over a
/// connection verified with the old one, is pinned too.
struct Follower<'a> {
    conn: &'a Conn,
    pins: Vec<String>,
}

impl Follower<'_> {
    fn client(&self) -> anyhow::Result<PrimaryClient> {
        self.conn.client_with_pins(&self.pins)
    }

    async fn view(&mut self) -> anyhow::Result<CaView> {
        let view = self.client()?.ca_status().await?;
        for r in &view.roots {
            if !self.pins.contains(&r.fingerprint) {
                self.pins.push(r.fingerprint.clone());
            }
        }
        Ok(view)
    }
}

/// Prints the rotation's progress until it finishes or pauses.
async fn follow_root(conn: &Conn, first: CaView, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut f = Follower {
        conn,
        pins: first.roots.iter().map(|r| r.fingerprint.clone()).collect(),
    };
    let mut last = String::new();
    let mut view = first;
    let mut failures = 0;
    loop {
        let Some(r) = &view.rotation else {
            bail!("no root rotation is recorded");
        };
        let line = if r.phase >= 4 && r.rolled_back {
            format!(
                "done: rolled back; root {} signs again and {} is no longer trusted",
                short(&r.to),
                short(&r.from)
            )
        } else if r.phase >= 4 {
            format!(
                "done: root {} replaced {}; every workload holds a certificate under it",
                short(&r.to),
                short(&r.from)
            )
        } else {
            progress(r)
        };
        if line != last {
            println!("{line}");
            last = line;
        }
        let paused = r.phase < 3
            && r.phase >= r.until
            && r.waiting_for.iter().any(|w| w.starts_with("paused"));
        if r.phase >= 4 || paused {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "gave up following after {}s, still at: {last}. The rotation goes on in the primary: `isthmusctl ca status` shows what it waits for, `isthmusctl ca rotate-root` follows it again, and `--rollback` (before phase 3) undoes it",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        match f.view().await {
            Ok(v) => {
                view = v;
                failures = 0;
            }
            // The primary may be restarting or moving to the new root.
            Err(e) if failures < 60 => {
                failures += 1;
                tracing::debug!(error = %e, "polling the rotation failed; retrying");
            }
            Err(e) => return Err(e.context("lost the primary while following the rotation")),
        }
    }
    if let Some(r) = &view.rotation
        && r.phase >= 4
        && conn.state_dir.is_none()
        && conn.ca_file.is_none()
        && let Some(token) = &conn.token
        && let Some((secret, _)) = isthmus_api::join_token::parse(token.trim())
    {
        println!(
            "your admin token now pins the new root:\n  {}",
            isthmus_api::join_token::format(secret, &view.signing_root)
        );
    }
    Ok(())
}

fn read(dir: &Path, name: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(dir.join(name))
        .with_context(|| format!("reading {}", dir.join(name).display()))
}

pub async fn run(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Federate {
            trust_domain,
            bundle,
            conn,
        } => {
            let text = if bundle.as_os_str() == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
                t
            } else {
                std::fs::read_to_string(&bundle)
                    .with_context(|| format!("reading {}", bundle.display()))?
            };
            let jwks: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a SPIFFE bundle (JSON)", bundle.display()))?;
            let view = conn.client()?.federate(&trust_domain, &jwks).await?;
            let roots = view
                .federated
                .iter()
                .find(|f| f.trust_domain == trust_domain)
                .map(|f| f.roots.len())
                .unwrap_or(0);
            println!(
                "federated with {trust_domain} ({roots} roots); proxies get it with bundle sequence {}",
                view.bundle_sequence
            );
            Ok(())
        }
        CaCmd::Unfederate { trust_domain, conn } => {
            conn.client()?.unfederate(&trust_domain).await?;
            println!("no longer federated with {trust_domain}");
            Ok(())
        }
        CaCmd::Status { conn, output } => {
            let view = conn.client()?.ca_status().await?;
            print(output, &view, || table(&view))
        }
        CaCmd::RotateRoot {
            until,
            rollback,
            no_wait,
            timeout,
            conn,
        } => {
            let view = conn
                .client()?
                .rotate_root(&RotateRoot { until, rollback })
                .await?;
            if let Some(r) = &view.rotation {
                println!(
                    "root rotation {} -> {}{}",
                    short(&r.from),
                    short(&r.to),
                    if r.rolled_back { " (rolling back)" } else { "" }
                );
            }
            if no_wait {
                return Ok(());
            }
            follow_root(&conn, view, Duration::from_secs(timeout)).await
        }
        CaCmd::ImportRoot {
            dir,
            until,
            no_wait,
            timeout,
            conn,
        } => {
            let req = ImportRoot {
                root_cert: read(&dir, "root-cert.pem")?,
                ca_cert: read(&dir, "ca-cert.pem")?,
                ca_key: read(&dir, "ca-key.pem")?,
                cert_chain: read(&dir, "cert-chain.pem").unwrap_or_default(),
                until,
            };
            let view = conn.client()?.import_root(&req).await?;
            println!("importing the CA from {}", dir.display());
            if no_wait {
                return Ok(());
            }
            follow_root(&conn, view, Duration::from_secs(timeout)).await
        }
        CaCmd::RotateIntermediate {
            cluster,
            no_wait,
            timeout,
            conn,
        } => {
            let client = conn.client()?;
            let old = client
                .ca_status()
                .await?
                .clusters
                .iter()
                .find(|c| c.cluster == cluster)
                .and_then(|c| c.fingerprint.clone());
            client.rotate_intermediate(&cluster).await?;
            println!("cluster {cluster}: renewing the intermediate");
            if no_wait {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            let mut last = String::new();
            loop {
                let view = client.ca_status().await?;
                let c = view
                    .clusters
                    .iter()
                    .find(|c| c.cluster == cluster)
                    .context("the cluster disappeared")?;
                let state = c.rotation.clone().unwrap_or_default();
                let line = match state.as_str() {
                    "reissuing" if c.fingerprint == old => {
                        "reissuing: waiting for the agent's new intermediate".into()
                    }
                    "reissuing" => format!(
                        "reissuing: {} workloads still on the old intermediate",
                        c.workloads_on_replaced
                    ),
                    "revoking" => "revoking: waiting for every proxy to hold the CRL".into(),
                    "done" => format!(
                        "done: intermediate {} in use; the old one is revoked",
                        c.fingerprint.as_deref().map(short).unwrap_or("-")
                    ),
                    other => other.to_string(),
                };
                if line != last {
                    println!("{line}");
                    last = line;
                }
                if state == "done" {
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "gave up following after {timeout}s, still at: {last}. The rotation goes on in the primary: `isthmusctl ca status` shows it; bring back the agent or proxies it waits for"
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_api::rest::RotationView;

    fn rotation(phase: u8, rolled_back: bool, waiting_for: &[&str]) -> RotationView {
        RotationView {
            from: "a".repeat(64),
            to: "b".repeat(64),
            phase,
            until: 3,
            rolled_back,
            started_unix: 0,
            phase_started_unix: 0,
            waiting_for: waiting_for.iter().map(|w| w.to_string()).collect(),
        }
    }

    #[test]
    fn progress_lines_say_what_the_phase_does_and_waits_for() {
        assert_eq!(
            progress(&rotation(
                1,
                false,
                &["paused after phase 1: run `isthmusctl ca rotate-root` to go on"]
            )),
            "phase 1/3 trust both roots: paused after phase 1: run `isthmusctl ca rotate-root` to go on"
        );
        assert_eq!(
            progress(&rotation(2, false, &["agent of east", "proxy p1"])),
            "phase 2/3 re-issue under the new root: waiting for agent of east; proxy p1"
        );
        assert_eq!(
            progress(&rotation(2, true, &["agent of east"])),
            "phase 2/3 re-issue under the old root again (rolling back): waiting for agent of east"
        );
        assert_eq!(
            progress(&rotation(3, true, &[])),
            "phase 3/3 drop the new root (rolling back)"
        );
    }
}
