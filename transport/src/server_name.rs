//! When a client reached the primary by a name or address its serving
//! certificate does not hold. A primary listening on a wildcard address
//! names only localhost, its listen and interface addresses and its
//! `--advertise` names in that certificate; a client that dials it through
//! a DNS name, a NAT or a load balancer fails the handshake, and rustls
//! reports that as a bare `NotValidForName` deep inside an HTTP or gRPC
//! error. This module finds it and says what to do: start the primary with
//! `--advertise HOST`.

use std::error::Error;
use std::io;

use rustls::CertificateError;

/// A certificate name mismatch found in an error chain: the name the client
/// expected, and the names the certificate holds (when rustls says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameMismatch {
    pub expected: Option<String>,
    pub presented: Vec<String>,
}

/// The certificate name mismatch somewhere in `err`'s chain, if any. An
/// `io::Error` hides the error it wraps from `source()`, so the walk steps
/// into it instead (hyper wraps rustls's io::Error in another).
pub fn find(err: &(dyn Error + 'static)) -> Option<NameMismatch> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = as_mismatch(e) {
            return Some(found);
        }
        next = match e.downcast_ref::<io::Error>() {
            // Its source() is the wrapped error's source, skipping the
            // wrapped error itself (which may be another io::Error).
            Some(io) => io.get_ref().map(|inner| inner as &(dyn Error + 'static)),
            None => e.source(),
        };
    }
    None
}

fn as_mismatch(e: &(dyn Error + 'static)) -> Option<NameMismatch> {
    match e.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            Some(NameMismatch {
                expected: None,
                presented: Vec::new(),
            })
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => Some(NameMismatch {
            expected: Some(expected.to_str().into_owned()),
            presented: presented.clone(),
        }),
        _ => None,
    }
}

/// The host part of `https://HOST:PORT` (IPv6 brackets removed).
fn host_of(reached: &str) -> &str {
    let rest = reached
        .strip_prefix("https://")
        .unwrap_or(reached)
        .split('/')
        .next()
        .unwrap_or_default();
    match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    }
}

/// A name as webpki reports it (`DnsName("localhost")`,
/// `IpAddress(127.0.0.1)`), as the user would type it.
fn plain_name(presented: &str) -> &str {
    for (open, close) in [("DnsName(\"", "\")"), ("IpAddress(", ")")] {
        if let Some(inner) = presented
            .strip_prefix(open)
            .and_then(|r| r.strip_suffix(close))
        {
            return inner;
        }
    }
    presented
}

impl NameMismatch {
    /// What to tell the user who reached the primary at `reached`
    /// (`https://HOST:PORT`).
    pub fn explain(&self, reached: &str) -> String {
        let host = self.expected.as_deref().unwrap_or_else(|| host_of(reached));
        let holds = if self.presented.is_empty() {
            String::from("a serving certificate that does not name it")
        } else {
            format!(
                "a serving certificate for {} only",
                self.presented
                    .iter()
                    .map(|n| plain_name(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        format!(
            "the primary reached at {reached} presented {holds}, not for {host}: start the \
             primary with --advertise {host} (comma-separated, for every name and address \
             clients use), or reach it by a name its certificate holds"
        )
    }
}

/// [`find`] and [`NameMismatch::explain`] at once.
pub fn explain(reached: &str, err: &(dyn Error + 'static)) -> Option<String> {
    find(err).map(|m| m.explain(reached))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    fn mismatch(presented: &[&str]) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("192.0.2.7")
                .map(|n| n.to_owned())
                .unwrap_or_else(|e| panic!("{e}")),
            presented: presented.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn a_mismatch_wrapped_in_io_and_other_errors_is_found() {
        let io = io::Error::other(io::Error::new(
            io::ErrorKind::InvalidData,
            mismatch(&["DnsName(\"localhost\")", "IpAddress(127.0.0.1)"]),
        ));
        let outer = anyhow_like("connecting", io);
        let found = find(outer.as_ref()).expect("found through the io::Error");
        assert_eq!(found.expected.as_deref(), Some("192.0.2.7"));
        assert_eq!(found.presented.len(), 2);
        let msg = found.explain("https://192.0.2.7:15014");
        assert!(
            msg.starts_with(
                "the primary reached at https://192.0.2.7:15014 presented a serving \
                 certificate for localhost, 127.0.0.1 only, not for 192.0.2.7"
            ),
            "{msg}"
        );
        assert!(msg.contains("--advertise 192.0.2.7"), "{msg}");
    }

    #[test]
    fn other_errors_are_not_mismatches() {
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(find(&io), None);
        assert_eq!(
            find(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            None
        );
    }

    #[test]
    fn without_context_the_host_comes_from_the_address() {
        let bare = NameMismatch {
            expected: None,
            presented: Vec::new(),
        };
        let msg = bare.explain("https://primary.example:15012");
        assert!(msg.contains("--advertise primary.example "), "{msg}");
        assert!(
            bare.explain("https://[2001:db8::1]:15012")
                .contains("--advertise 2001:db8::1 "),
            "v6"
        );
    }

    /// An error whose source is `inner`, as HTTP and gRPC clients wrap
    /// connection errors.
    fn anyhow_like(what: &'static str, inner: io::Error) -> Box<dyn Error + 'static> {
        #[derive(Debug)]
        struct Wrapped(&'static str, io::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl Error for Wrapped {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.1)
            }
        }
        Box::new(Wrapped(what, inner))
    }
}
