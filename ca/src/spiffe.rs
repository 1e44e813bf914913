//! SPIFFE IDs, validated as the SPIFFE-ID standard requires:
//! `spiffe://<trust-domain>/<path>`, a lowercase trust domain of at most 255
//! bytes, no port, userinfo, query or fragment, no empty, `.` or `..` path
//! segments, no percent-encoding, and at most 2048 bytes in all.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID the standard allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// The namespace of Isthmus's own identities (`isthmus-system/isthmus-agent`
/// is every agent's); reserved, never issued to a workload.
pub const SYSTEM_NAMESPACE: &str = "isthmus-system";
/// The longest trust domain the standard allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes; at most 2048 are allowed")]
    TooLong(usize),
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error("trust domain is {0} bytes; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    #[error(
        "trust domain {0:?} may hold only lowercase letters, digits, '.', '-' and '_' (no port, userinfo or uppercase)"
    )]
    BadTrustDomain(String),
    #[error("SPIFFE ID may not carry a query or fragment")]
    QueryOrFragment,
    #[error("SPIFFE ID path has an empty segment (a doubled or trailing '/')")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error(
        "SPIFFE ID path may hold only letters, digits, '.', '-' and '_' (no percent-encoding): {0:?}"
    )]
    BadPathChar(char),
    #[error("SPIFFE ID {0:?} names a trust domain, not a workload")]
    NoPath(String),
}

/// A validated SPIFFE ID. Its string form is kept as given, which is already
/// canonical because validation refuses everything that could be spelled two
/// ways.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    td_end: usize,
}

impl SpiffeId {
    /// Parses and validates any SPIFFE ID, including a bare trust domain.
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        if s.is_empty() {
            return Err(SpiffeError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(SpiffeError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeError::MissingTrustDomain);
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeError::TrustDomainTooLong(td.len()));
        }
        if !td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(SpiffeError::BadTrustDomain(td.chars().take(64).collect()));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(SpiffeError::EmptySegment),
                    "." | ".." => return Err(SpiffeError::DotSegment),
                    _ => {}
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(SpiffeError::BadPathChar(c));
                }
            }
        }
        Ok(Self {
            id: s.to_string(),
            td_end: "spiffe://".len() + td.len(),
        })
    }

    /// Parses an ID that must name a workload (it has a path).
    pub fn parse_workload(s: &str) -> Result<Self, SpiffeError> {
        let id = Self::parse(s)?;
        if id.path().is_empty() {
            return Err(SpiffeError::NoPath(s.to_string()));
        }
        Ok(id)
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`, Istio's workload identity.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        Self::parse_workload(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.td_end]
    }

    /// The path, with its leading '/', or "" for a bare trust domain.
    pub fn path(&self) -> &str {
        &self.id[self.td_end..]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The namespace and service account of an Istio-style identity.
    /// Whether this is one of Isthmus's own identities (the namespace
    /// [`SYSTEM_NAMESPACE`], where the agent's identity lives), which no
    /// workload may be issued: a workload holding the agent's identity
    /// could speak for its cluster to the primary.
    pub fn is_reserved(&self) -> bool {
        self.namespace_and_account()
            .is_some_and(|(ns, _)| ns == SYSTEM_NAMESPACE)
    }

    pub fn namespace_and_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_workload_ids() {
        let id = SpiffeId::workload("cluster.local", "demo", "echo").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/echo");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_account(), Some(("demo", "echo")));
    }

    #[test]
    fn rejects_malformed_ids_with_a_typed_error() {
        let cases: &[(&str, SpiffeError)] = &[
            ("", SpiffeError::Empty),
            ("http://td/ns/a", SpiffeError::WrongScheme),
            ("SPIFFE://td/a", SpiffeError::WrongScheme),
            ("spiffe:///a", SpiffeError::MissingTrustDomain),
            (
                "spiffe://Example.org/a",
                SpiffeError::BadTrustDomain("Example.org".into()),
            ),
            (
                "spiffe://td:8080/a",
                SpiffeError::BadTrustDomain("td:8080".into()),
            ),
            (
                "spiffe://user@td/a",
                SpiffeError::BadTrustDomain("user@td".into()),
            ),
            ("spiffe://td/a?x=1", SpiffeError::QueryOrFragment),
            ("spiffe://td/a#f", SpiffeError::QueryOrFragment),
            ("spiffe://td/a//b", SpiffeError::EmptySegment),
            ("spiffe://td/a/", SpiffeError::EmptySegment),
            ("spiffe://td/a/../b", SpiffeError::DotSegment),
            ("spiffe://td/./b", SpiffeError::DotSegment),
            ("spiffe://td/%2e/b", SpiffeError::BadPathChar('%')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
        assert!(matches!(
            SpiffeId::parse_workload("spiffe://td"),
            Err(SpiffeError::NoPath(_))
        ));
    }

    #[test]
    fn length_limits_are_exact() {
        let prefix = "spiffe://td/";
        let exact = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(exact.len(), 2048);
        assert!(SpiffeId::parse(&exact).is_ok());
        let over = format!("{exact}a");
        assert_eq!(SpiffeId::parse(&over), Err(SpiffeError::TooLong(2049)));
        let td = "a".repeat(256);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td}/x")),
            Err(SpiffeError::TrustDomainTooLong(256))
        );
    }
}
