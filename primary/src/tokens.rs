//! Secrets the primary hands out (join tokens, gateway credentials, the
//! admin token): 256 random bits, stored only as SHA-256 digests. The join
//! token's wire format is in [`isthmus_api::join_token`].

use base64::Engine;
use sha2::{Digest, Sha256};

pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares a presented secret with a stored digest. Hashing first means the
/// comparison time says nothing about the stored secret.
pub fn matches(presented: &str, stored_sha256: &str) -> bool {
    sha256_hex(presented) == stored_sha256
}

/// The digest an admin token is checked by. A token in the join-token form
/// (`ist1.<secret>.<root sha256>`) is checked by its secret alone: the root
/// pin after it is for the client, and moves when the root is rotated.
pub fn admin_digest(token: &str) -> String {
    let token = token.trim();
    match isthmus_api::join_token::parse(token) {
        Some((secret, _)) => sha256_hex(secret),
        None => sha256_hex(token),
    }
}
