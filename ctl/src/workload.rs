//! `isthmusctl workload credential`: makes a workload's credential for a
//! file registry, or prints the `tokenSha256` of an existing one.
//!
//! The credential and its hash are defined in
//! [`isthmus_api::workload_credential`]: a new token file holds 64 hex
//! characters and no newline (mode 0600, never overwritten), so `sha256sum`
//! of it equals the registry's `tokenSha256`. The command prints the line to
//! put in the workload's registry entry.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use isthmus_api::workload_credential;

use crate::{Output, print};

#[derive(clap::Subcommand)]
pub enum WorkloadCmd {
    /// Make a workload credential (a 0600 token file for the sidecar's
    /// `--token-file`) and print the `tokenSha256` line for its registry
    /// entry; with `--hash`, print that line for an existing token file.
    Credential {
        /// The token file to create (refused if it exists).
        #[arg(long, required_unless_present = "hash", conflicts_with = "hash")]
        out: Option<PathBuf>,
        /// An existing token file whose `tokenSha256` to print.
        #[arg(long, value_name = "FILE")]
        hash: Option<PathBuf>,
        /// Output format: `table` prints the registry line.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Made {
    file: String,
    token_sha256: String,
}

pub fn run(cmd: WorkloadCmd) -> anyhow::Result<()> {
    match cmd {
        WorkloadCmd::Credential { out, hash, output } => {
            let (file, digest) = match (out, hash) {
                (Some(out), _) => {
                    let credential = workload_credential::generate();
                    create_private(&out, &credential)?;
                    (out, workload_credential::sha256_hex(&credential))
                }
                (None, Some(existing)) => {
                    let digest = hash_file(&existing)?;
                    (existing, digest)
                }
                (None, None) => bail!("say --out FILE to make a credential or --hash FILE"),
            };
            let made = Made {
                file: file.display().to_string(),
                token_sha256: digest,
            };
            print(output, &made, || {
                format!("tokenSha256: {}\n", made.token_sha256)
            })
        }
    }
}

/// The `tokenSha256` of the credential in `path`.
fn hash_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let credential = workload_credential::from_file_bytes(&bytes)
        .with_context(|| format!("{} holds no workload credential", path.display()))?;
    Ok(workload_credential::sha256_hex(credential))
}

/// Writes `contents` to a new file readable only by its owner.
fn create_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} exists: a workload may be using it. Remove it first, or print its hash with --hash {}",
                path.display(),
                path.display()
            ),
            _ => anyhow::Error::new(e).context(format!("creating {}", path.display())),
        })?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_credential_hashes_as_sha256sum_and_is_private() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("w.token");
        create_private(&file, "abc").expect("created");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).expect("metadata").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // `printf abc | sha256sum`
        assert_eq!(
            hash_file(&file).expect("a credential"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let again = create_private(&file, "def").expect_err("never overwritten");
        assert!(format!("{again:#}").contains("--hash"), "{again:#}");
        assert_eq!(std::fs::read(&file).expect("read"), b"abc");
    }
}
