//! The join token format, `ist1.<secret>.<root sha256 hex>`. The primary
//! mints it; the agent presents the secret and pins the primary's root CA by
//! the fingerprint on its very first connection (as kubeadm's discovery
//! hash does), before it has any other reason to trust the primary.

pub fn format(secret: &str, root_fingerprint: &str) -> String {
    format!("ist1.{secret}.{root_fingerprint}")
}

/// Splits a join token into (secret, root fingerprint).
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("ist1.")?;
    let (secret, fp) = rest.rsplit_once('.')?;
    let ok = !secret.is_empty() && fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some((secret, fp))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_garbage() {
        let fp = "ab".repeat(32);
        let t = super::format("s3cr.et", &fp);
        assert_eq!(super::parse(&t), Some(("s3cr.et", fp.as_str())));
        for bad in [
            "",
            "ist1.",
            "ist1.x.y",
            "ist2.x.".repeat(2).as_str(),
            "ist1..abc",
        ] {
            assert_eq!(super::parse(bad), None, "{bad}");
        }
    }
}
