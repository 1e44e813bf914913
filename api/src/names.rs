//! Istio-compatible names: service FQDNs, outbound cluster names and the
//! SNI that mesh mTLS connections carry, `outbound_.PORT_.SUBSET_.FQDN`.
//!
//! The SNI parser faces the network (the east-west gateway reads it from an
//! untrusted ClientHello), so it validates strictly and never panics.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("SNI {0:?} does not start with \"outbound_.\"")]
    NotOutbound(String),
    #[error("SNI {0:?} is not of the form outbound_.PORT_.SUBSET_.FQDN")]
    Malformed(String),
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    #[error("subset {0:?} is not a DNS label (lowercase letters, digits and '-')")]
    BadSubset(String),
    #[error("host {0:?} is not a lowercase DNS name of at most 253 bytes")]
    BadHost(String),
}

/// A service port in the mesh, optionally narrowed to a subset: the thing an
/// outbound cluster and its SNI name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub fqdn: String,
    pub port: u16,
    pub subset: String,
}

impl ServiceKey {
    pub fn new(fqdn: impl Into<String>, port: u16) -> Self {
        Self {
            fqdn: fqdn.into(),
            port,
            subset: String::new(),
        }
    }

    /// `outbound_.8080_._.echo.demo.svc.cluster.local`, as Istio spells it.
    pub fn sni(&self) -> String {
        let subset = if self.subset.is_empty() {
            "_"
        } else {
            &self.subset
        };
        // Istio writes an empty subset as a lone "_", giving "_._.".
        if self.subset.is_empty() {
            format!("outbound_.{}_.{}.{}", self.port, subset, self.fqdn)
        } else {
            format!("outbound_.{}_.{}_.{}", self.port, subset, self.fqdn)
        }
    }

    /// `outbound|8080||echo.demo.svc.cluster.local`, Istio's cluster name.
    pub fn cluster_name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset, self.fqdn)
    }

    /// Parses an SNI taken from an untrusted ClientHello.
    pub fn parse_sni(sni: &str) -> Result<Self, NameError> {
        let rest = sni
            .strip_prefix("outbound_.")
            .ok_or_else(|| NameError::NotOutbound(truncate(sni)))?;
        let (port, rest) = rest
            .split_once("_.")
            .ok_or_else(|| NameError::Malformed(truncate(sni)))?;
        let port = parse_port(port)?;
        // Empty subset: "_.FQDN"; named subset: "v1_.FQDN".
        let (subset, fqdn) = if let Some(fqdn) = rest.strip_prefix("_.") {
            (String::new(), fqdn)
        } else {
            let (subset, fqdn) = rest
                .split_once("_.")
                .ok_or_else(|| NameError::Malformed(truncate(sni)))?;
            check_label(subset).map_err(|_| NameError::BadSubset(truncate(subset)))?;
            (subset.to_string(), fqdn)
        };
        check_host(fqdn)?;
        Ok(Self {
            fqdn: fqdn.to_string(),
            port,
            subset,
        })
    }

    /// Parses an outbound cluster name, `outbound|PORT|SUBSET|FQDN`.
    pub fn parse_cluster_name(name: &str) -> Result<Self, NameError> {
        let mut parts = name.splitn(4, '|');
        let (Some("outbound"), Some(port), Some(subset), Some(fqdn)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(NameError::Malformed(truncate(name)));
        };
        let port = parse_port(port)?;
        if !subset.is_empty() {
            check_label(subset).map_err(|_| NameError::BadSubset(truncate(subset)))?;
        }
        check_host(fqdn)?;
        Ok(Self {
            fqdn: fqdn.to_string(),
            port,
            subset: subset.to_string(),
        })
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cluster_name())
    }
}

/// `name.namespace.svc.domain`.
/// How `proxy-config routes` shows one destination of a route, whichever
/// data plane's dump it comes from: the cluster, the service host, port and
/// subset its name encodes, and its share of the traffic in percent.
pub fn destination_view(cluster: &str, percent: f64) -> serde_json::Value {
    let key = ServiceKey::parse_cluster_name(cluster).ok();
    serde_json::json!({
        "cluster": cluster,
        "host": key.as_ref().map(|k| k.fqdn.clone()),
        "port": key.as_ref().map(|k| k.port),
        "subset": key.as_ref().map(|k| k.subset.clone()).filter(|s| !s.is_empty()),
        "percent": percent,
    })
}

pub fn service_fqdn(name: &str, namespace: &str, cluster_domain: &str) -> String {
    format!("{name}.{namespace}.svc.{cluster_domain}")
}

/// The names a host may stand for when a workload in `namespace` uses it,
/// in the order Istio's sidecars resolve them (the search list of a pod's
/// resolv.conf: `NAMESPACE.svc.DOMAIN`, `svc.DOMAIN`, `DOMAIN`), after the
/// host itself: `echo` is first `echo`, then `echo.NAMESPACE.svc.DOMAIN`;
/// `echo.demo` is `echo.demo`, then `echo.demo.svc.DOMAIN`. A host that
/// already ends in `.svc.DOMAIN` stands only for itself. The caller takes
/// the first one it knows.
pub fn search_names(host: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    let host = host.trim_end_matches('.');
    let mut names = vec![host.to_string()];
    if host.ends_with(&format!(".svc.{cluster_domain}")) {
        return names;
    }
    for suffix in [
        format!("{namespace}.svc.{cluster_domain}"),
        format!("svc.{cluster_domain}"),
        cluster_domain.to_string(),
    ] {
        names.push(format!("{host}.{suffix}"));
    }
    names
}

/// A service name as a user gives it, `NAME`, `NAME.NAMESPACE`,
/// `NAME.NAMESPACE.svc` or `NAME.NAMESPACE.svc.DOMAIN`, expanded as Istio
/// does for a caller in `namespace`: `(NAME, NAMESPACE)`.
pub fn service_name_and_namespace<'a>(
    host: &'a str,
    namespace: &'a str,
    cluster_domain: &str,
) -> Result<(&'a str, &'a str), NameError> {
    let host = host.trim_end_matches('.');
    let short = host
        .strip_suffix(cluster_domain)
        .and_then(|h| h.strip_suffix('.'))
        .unwrap_or(host);
    let short = short.strip_suffix(".svc").unwrap_or(short);
    let (name, ns) = match short.split_once('.') {
        None => (short, namespace),
        Some((name, ns)) => (name, ns),
    };
    check_label(name).map_err(|_| NameError::BadHost(truncate(host)))?;
    check_label(ns).map_err(|_| NameError::BadHost(truncate(host)))?;
    Ok((name, ns))
}

fn parse_port(s: &str) -> Result<u16, NameError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(NameError::BadPort(truncate(s))),
    }
}

/// A DNS label: 1-63 bytes of lowercase letters, digits and '-', not starting
/// or ending with '-'.
pub fn check_label(label: &str) -> Result<(), NameError> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadHost(truncate(label)))
    }
}

/// A lowercase DNS name of labels separated by dots, at most 253 bytes.
pub fn check_host(host: &str) -> Result<(), NameError> {
    if host.is_empty() || host.len() > 253 || host.split('.').any(|l| check_label(l).is_err()) {
        return Err(NameError::BadHost(truncate(host)));
    }
    Ok(())
}

/// Keeps error messages bounded when the input is hostile.
fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips_istio_spelling() {
        let key = ServiceKey::new("echo.demo.svc.cluster.local", 8080);
        assert_eq!(key.sni(), "outbound_.8080_._.echo.demo.svc.cluster.local");
        assert_eq!(ServiceKey::parse_sni(&key.sni()), Ok(key.clone()));
        assert_eq!(
            key.cluster_name(),
            "outbound|8080||echo.demo.svc.cluster.local"
        );
        assert_eq!(ServiceKey::parse_cluster_name(&key.cluster_name()), Ok(key));

        let v1 = ServiceKey {
            subset: "v1".into(),
            ..ServiceKey::new("reviews.default.svc.cluster.local", 9080)
        };
        assert_eq!(
            v1.sni(),
            "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
        );
        assert_eq!(ServiceKey::parse_sni(&v1.sni()), Ok(v1));
    }

    #[test]
    fn short_names_expand_within_the_callers_namespace() {
        let d = "cluster.local";
        assert_eq!(
            search_names("echo", "demo", d),
            [
                "echo",
                "echo.demo.svc.cluster.local",
                "echo.svc.cluster.local",
                "echo.cluster.local"
            ]
        );
        assert_eq!(
            search_names("echo.prod", "demo", d)[2],
            "echo.prod.svc.cluster.local"
        );
        assert_eq!(
            search_names("echo.prod.svc", "demo", d)[3],
            "echo.prod.svc.cluster.local"
        );
        assert_eq!(
            search_names("echo.prod.svc.cluster.local", "demo", d),
            ["echo.prod.svc.cluster.local"]
        );

        for (given, want) in [
            ("echo", ("echo", "demo")),
            ("echo.prod", ("echo", "prod")),
            ("echo.prod.svc", ("echo", "prod")),
            ("echo.prod.svc.cluster.local", ("echo", "prod")),
            ("echo.prod.svc.cluster.local.", ("echo", "prod")),
        ] {
            assert_eq!(
                service_name_and_namespace(given, "demo", d),
                Ok(want),
                "{given}"
            );
        }
        for bad in [
            "",
            "Echo",
            "a.b.c",
            "echo.prod.svc.other.domain",
            "echo..svc",
        ] {
            assert!(service_name_and_namespace(bad, "demo", d).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_sni_is_refused_with_a_reason() {
        let cases = [
            ("", "outbound_."),
            ("inbound_.80_._.a.b", "outbound_."),
            ("outbound_.", "form"),
            ("outbound_.0_._.a.b", "port"),
            ("outbound_.70000_._.a.b", "port"),
            ("outbound_.+80_._.a.b", "port"),
            ("outbound_.80_._.", "host"),
            ("outbound_.80_._.A.b", "host"),
            ("outbound_.80_._.a..b", "host"),
            ("outbound_.80_.V1_.a.b", "subset"),
            ("outbound_.80_.v1", "form"),
        ];
        for (sni, want) in cases {
            let err = ServiceKey::parse_sni(sni).expect_err(sni).to_string();
            assert!(err.contains(want), "{sni:?}: {err}");
        }
        let long = format!("outbound_.80_._.{}", "a.".repeat(200));
        let err = ServiceKey::parse_sni(&long).expect_err("long").to_string();
        assert!(err.len() < 200, "error text stays bounded: {err}");
    }
}
