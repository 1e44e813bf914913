//! `docs/running-by-hand.md`, followed as written: `by_hand.sh` runs each
//! of its shell blocks on the host it names, each host a network namespace,
//! and the request must cross the mesh from east's client to a west echo
//! through west's gateway (whose metrics count it by SNI). Also: every flag the guide's
//! commands use is explained in one of its tables.
//!
//! Needs root and iproute2 (and curl). Without them the test skips, and
//! with `CI` set it fails instead, as every e2e test does.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn guide() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/running-by-hand.md")
}

/// The shell blocks that name a host (```` ```sh host=NAME ````).
fn host_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(block) = current.as_mut() {
            if line.starts_with("```") {
                blocks.extend(current.take());
            } else {
                block.push_str(line);
                block.push('\n');
            }
        } else if line.starts_with("```sh host=") {
            current = Some(String::new());
        }
    }
    blocks
}

#[test]
fn every_flag_the_guide_uses_is_explained_in_it() {
    let text = std::fs::read_to_string(guide()).expect("reading the guide");
    let blocks = host_blocks(&text);
    assert!(blocks.len() >= 6, "the guide's blocks: {blocks:?}");
    let explained: String = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = BTreeSet::new();
    for block in &blocks {
        // isthmusctl's flags: `--word`, outside the shell's own tools.
        for line in block.lines().filter(|l| {
            let l = l.trim_start();
            !l.starts_with("timeout") && !l.starts_with("head") && !l.starts_with("curl")
        }) {
            for word in line.split_whitespace() {
                if let Some(flag) = word.strip_prefix("--")
                    && !flag.is_empty()
                    && flag.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                {
                    used.insert(format!("`--{flag}"));
                }
            }
        }
    }
    assert!(used.len() > 20, "{used:?}");
    let unexplained: Vec<&String> = used.iter().filter(|f| !explained.contains(*f)).collect();
    assert!(
        unexplained.is_empty(),
        "flags the guide uses but does not explain: {unexplained:?}"
    );
}

fn can_run() -> Result<(), &'static str> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    let curl = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    match (root && ip, curl) {
        (false, _) => Err("network namespaces need root and iproute2"),
        (_, false) => Err("the guide's commands need curl"),
        _ => Ok(()),
    }
}

#[test]
fn the_by_hand_guide_runs_on_network_namespaces() {
    if let Err(reason) = can_run() {
        // The rule of isthmus_e2e::skip: a failure in CI, else a line that
        // passes libtest's capture so scripts/test.sh can name the test.
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
        assert!(
            !ci,
            "the by-hand guide could not run in CI (CI is set): {reason}"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_by_hand_guide_runs_on_network_namespaces: {reason}"
        );
        return;
    }
    let work = tempfile::tempdir().expect("temp dir");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_isthmusctl"))
        .parent()
        .expect("isthmusctl's directory")
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("a PATH");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/by_hand.sh");
    // The script bounds every wait in the guide with `timeout`.
    let out = Command::new("bash")
        .arg(&script)
        .arg(guide())
        .arg(work.path())
        .env("PATH", path)
        .env_remove("ISTHMUS_PRIMARY")
        .env_remove("ISTHMUS_TOKEN")
        .env_remove("ISTHMUS_PRIMARY_GRPC")
        .output()
        .expect("running by_hand.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the guide failed:\n{stderr}\n{stdout}"
    );
    assert!(stdout.contains(r#""cluster": "west""#), "{stdout}");
    assert!(
        stdout.contains("URI=spiffe://cluster.local/ns/demo/sa/client"),
        "{stdout}"
    );
    // It went through west's gateway, by its SNI.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("isthmus_gateway_connections_total{")
                && l.contains("outbound_.8080_._.echo.demo.svc.cluster.local")),
        "{stdout}"
    );
}
