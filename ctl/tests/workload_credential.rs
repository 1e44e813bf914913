//! `isthmusctl workload credential`, run as a user runs it: the token file
//! it writes is private, `sha256sum` of it is the hash it prints, and that
//! hash is what the agent compares, for files with and without a trailing
//! newline.

use std::process::Command;

fn isthmusctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
        .args(args)
        .output()
        .expect("running isthmusctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sha256sum FILE`'s digest.
fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

#[test]
fn a_made_credential_prints_the_hash_sha256sum_gives() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("echo.token");
    let f = file.to_str().expect("utf-8 temp path");

    let (ok, out, err) = isthmusctl(&["workload", "credential", "--out", f]);
    assert!(ok, "{err}");
    let printed = out
        .strip_prefix("tokenSha256: ")
        .and_then(|s| s.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("one registry line: {out:?}"));
    assert_eq!(printed, sha256sum(&file));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file).expect("metadata").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Never overwritten; --hash prints the same line.
    let (ok, _, err) = isthmusctl(&["workload", "credential", "--out", f]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, again, err) = isthmusctl(&["workload", "credential", "--hash", f]);
    assert!(ok, "{err}");
    assert_eq!(again, out);

    // JSON names the file and the hash.
    let (ok, json, err) = isthmusctl(&["workload", "credential", "--hash", f, "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["tokenSha256"], printed);
    assert_eq!(v["file"], f);
}

#[test]
fn a_trailing_newline_is_not_part_of_the_credential() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bare = dir.path().join("bare.token");
    let newline = dir.path().join("newline.token");
    std::fs::write(&bare, "s3cret").expect("write");
    std::fs::write(&newline, "s3cret\n").expect("write");
    let hash = |p: &std::path::Path| {
        let (ok, out, err) = isthmusctl(&[
            "workload",
            "credential",
            "--hash",
            p.to_str().expect("utf-8 temp path"),
        ]);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(hash(&bare), hash(&newline));
    assert_eq!(hash(&bare), format!("tokenSha256: {}\n", sha256sum(&bare)));

    // A file with more than one newline is refused, not silently trimmed.
    let two = dir.path().join("two.token");
    std::fs::write(&two, "s3cret\n\n").expect("write");
    let (ok, _, err) = isthmusctl(&[
        "workload",
        "credential",
        "--hash",
        two.to_str().expect("utf-8 temp path"),
    ]);
    assert!(!ok, "refused");
    assert!(
        err.contains("only one trailing newline is removed"),
        "{err}"
    );
}
