//! `isthmusctl`'s global options, run as a user runs them: the same option
//! before and after the command's name must reach the same code. With a
//! state dir that holds no mesh, both orders must fail the same way, naming
//! that dir. The CLI's `ISTHMUS_PRIMARY` (REST) never reaches a component,
//! which reads `ISTHMUS_PRIMARY_GRPC`.

use std::process::Command;

fn isthmusctl(args: &[&str]) -> (bool, String) {
    isthmusctl_with(args, &[])
}

fn isthmusctl_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
        .args(args)
        .env_remove("ISTHMUS_PRIMARY")
        .env_remove("ISTHMUS_PRIMARY_GRPC")
        .envs(env.iter().copied())
        .env_remove("ISTHMUS_TOKEN")
        .env_remove("ISTHMUS_CA_FILE")
        .output()
        .expect("running isthmusctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn state_dir_before_and_after_ca_status_reach_the_same_code() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().join("no-mesh-here");
    let d = d.to_str().expect("utf-8 temp path");

    let (ok_before, before) = isthmusctl(&["--state-dir", d, "ca", "status"]);
    let (ok_after, after) = isthmusctl(&["ca", "status", "--state-dir", d]);

    assert!(!ok_before && !ok_after, "no mesh there: {before} / {after}");
    // Not clap's usage error: both got as far as reading the state dir.
    assert!(!before.contains("Usage:"), "{before}");
    assert!(before.contains("no-mesh-here"), "{before}");
    assert_eq!(before, after);
}

#[test]
fn without_a_state_dir_or_primary_the_error_says_which_to_give() {
    let (ok, err) = isthmusctl(&["-o", "json", "ca", "status"]);
    assert!(!ok);
    assert!(err.contains("--state-dir"), "{err}");
}

#[test]
fn components_read_the_grpc_variable_and_not_the_clis() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing");
    let missing = missing.to_str().expect("utf-8 temp path");
    let gateway = [
        "component",
        "gateway",
        "--cluster",
        "east",
        "--token-file",
        missing,
        "--roots",
        missing,
    ];

    let (ok, err) = isthmusctl_with(&gateway, &[("ISTHMUS_PRIMARY", "https://127.0.0.1:15014")]);
    assert!(!ok);
    assert!(err.contains("--primary"), "{err}");

    // With the gRPC variable it gets past its flags, to its credential file.
    let (ok, err) = isthmusctl_with(
        &gateway,
        &[("ISTHMUS_PRIMARY_GRPC", "https://127.0.0.1:15012")],
    );
    assert!(!ok);
    assert!(err.contains("reading gateway credential"), "{err}");
}
