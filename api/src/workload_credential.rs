//! The workload credential of file-registry mode, defined once for the
//! agent, the sidecar and `isthmusctl`.
//!
//! A token file holds the credential. The credential is the file's bytes
//! with one trailing newline (`\n` or `\r\n`) removed, and nothing else
//! removed; it must then be non-empty visible ASCII (it travels as an HTTP
//! bearer token). The registry's `tokenSha256` is the lowercase hex SHA-256
//! of the credential. So for a file without a trailing newline (what
//! `isthmusctl workload credential` writes) `sha256sum FILE` is the hash;
//! for a file that ends in a newline it is `tr -d '\n' <FILE | sha256sum`.

use sha2::{Digest, Sha256};

/// Random bytes in a generated credential (hex-encoded: 64 characters).
pub const RANDOM_BYTES: usize = 32;

/// Why a token file holds no usable credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("the token file is empty (after removing one trailing newline)")]
    Empty,
    #[error(
        "the token file holds a byte that cannot be in a bearer token (0x{byte:02x} at offset {offset}): \
         only visible ASCII is allowed, and only one trailing newline is removed"
    )]
    Invalid { byte: u8, offset: usize },
}

/// The credential a token file's `bytes` hold.
pub fn from_file_bytes(bytes: &[u8]) -> Result<&str, CredentialError> {
    let body = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    if body.is_empty() {
        return Err(CredentialError::Empty);
    }
    if let Some(offset) = body.iter().position(|b| !b.is_ascii_graphic()) {
        return Err(CredentialError::Invalid {
            byte: body[offset],
            offset,
        });
    }
    // Visible ASCII only, checked above.
    std::str::from_utf8(body).map_err(|_| CredentialError::Invalid { byte: 0, offset: 0 })
}

/// The registry's `tokenSha256` of `credential`: lowercase hex SHA-256.
pub fn sha256_hex(credential: &str) -> String {
    hex::encode(Sha256::digest(credential.as_bytes()))
}

/// A new random credential: [`RANDOM_BYTES`] bytes, hex-encoded.
pub fn generate() -> String {
    hex::encode(rand::random::<[u8; RANDOM_BYTES]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_removed_and_nothing_else() {
        assert_eq!(from_file_bytes(b"abc"), Ok("abc"));
        assert_eq!(from_file_bytes(b"abc\n"), Ok("abc"));
        assert_eq!(from_file_bytes(b"abc\r\n"), Ok("abc"));
        // A second newline, a space or a tab is not stripped but refused:
        // the credential would not be what the file seems to hold.
        assert_eq!(
            from_file_bytes(b"abc\n\n"),
            Err(CredentialError::Invalid {
                byte: b'\n',
                offset: 3
            })
        );
        assert_eq!(
            from_file_bytes(b" abc"),
            Err(CredentialError::Invalid {
                byte: b' ',
                offset: 0
            })
        );
        assert_eq!(from_file_bytes(b"\n"), Err(CredentialError::Empty));
        assert_eq!(from_file_bytes(b""), Err(CredentialError::Empty));
        assert!(from_file_bytes("é".as_bytes()).is_err());
    }

    #[test]
    fn the_hash_is_sha256sum_of_a_file_without_newline() {
        // `printf abc | sha256sum`
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex("abc"), abc);
        // A file "abc\n" holds the same credential, hence the same hash.
        assert_eq!(
            sha256_hex(from_file_bytes(b"abc\n").expect("a credential")),
            abc
        );
    }

    #[test]
    fn generated_credentials_are_valid_and_distinct() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 * RANDOM_BYTES);
        assert_eq!(from_file_bytes(a.as_bytes()), Ok(a.as_str()));
    }
}
