//! How the workload CA logs a refused credential. A workload whose token
//! the registry does not know (a `tokenSha256` computed over other bytes, a
//! stale token file) otherwise retries forever while the agent stays
//! silent, so each refusal is logged at WARN with the reason the workload
//! was given and the SHA-256 of what it presented, to compare with the
//! registry's `tokenSha256`. A workload in a retry loop must not flood the
//! log: at most [`RefusalLog::PER_WINDOW`] lines per [`RefusalLog::WINDOW`]
//! reach WARN, the rest go to DEBUG and are counted in the next WARN line.
//! Strings that come from outside the agent (a TokenReview's answer) are
//! escaped and cut short.

use std::time::{Duration, Instant};

use isthmus_transport::handshake_log::Admit;

/// The budget of WARN lines for refused credentials.
#[derive(Debug)]
pub struct RefusalLog {
    budget: isthmus_transport::handshake_log::RefusalLog,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl RefusalLog {
    pub const WINDOW: Duration = Duration::from_secs(60);
    pub const PER_WINDOW: u32 = 10;

    pub fn new(start: Instant) -> Self {
        Self {
            budget: isthmus_transport::handshake_log::RefusalLog::with_budget(
                start,
                Self::WINDOW,
                Self::PER_WINDOW,
            ),
        }
    }

    /// Whether a refusal at `now` is logged at WARN (and how many before it
    /// were not) or at DEBUG only.
    pub fn admit(&self, now: Instant) -> Admit {
        self.budget.admit(now)
    }

    /// Logs one refused credential. `code` is the metric's reason label,
    /// `reason` what the workload was told, `credential_sha256` the digest
    /// of the credential presented, when there was one.
    pub fn refused(&self, code: &str, reason: &str, credential_sha256: Option<&str>) {
        let reason = escape(reason);
        let digest = credential_sha256.unwrap_or("none presented");
        match self.admit(Instant::now()) {
            Admit::Info {
                suppressed_before: 0,
            } => tracing::warn!(
                code,
                %reason,
                credential_sha256 = digest,
                "refused a workload credential"
            ),
            Admit::Info { suppressed_before } => tracing::warn!(
                code,
                %reason,
                credential_sha256 = digest,
                not_logged_before = suppressed_before,
                "refused a workload credential"
            ),
            Admit::Debug => tracing::debug!(
                code,
                %reason,
                credential_sha256 = digest,
                "refused a workload credential"
            ),
        }
    }
}

pub use isthmus_transport::handshake_log::{MAX_LOGGED, escape};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_budget_reaches_warn_and_the_rest_are_counted() {
        let t0 = Instant::now();
        let log = RefusalLog::new(t0);
        for i in 0..RefusalLog::PER_WINDOW {
            assert_eq!(
                log.admit(t0 + Duration::from_secs(u64::from(i))),
                Admit::Info {
                    suppressed_before: 0
                },
                "refusal {i} of the first window"
            );
        }
        // A workload retrying in a loop: the rest of the minute is DEBUG.
        for s in [0, 1, 30, 59] {
            assert_eq!(log.admit(t0 + Duration::from_secs(s)), Admit::Debug);
        }
        // The next minute logs again, first saying how many were not.
        let next = t0 + RefusalLog::WINDOW;
        assert_eq!(
            log.admit(next),
            Admit::Info {
                suppressed_before: 4
            }
        );
        assert_eq!(
            log.admit(next),
            Admit::Info {
                suppressed_before: 0
            }
        );
        // A quiet spell of several windows starts afresh.
        let later = t0 + RefusalLog::WINDOW * 5;
        for _ in 0..RefusalLog::PER_WINDOW {
            assert!(matches!(log.admit(later), Admit::Info { .. }));
        }
        assert_eq!(log.admit(later), Admit::Debug);
    }

    #[test]
    fn untrusted_strings_are_escaped_and_cut() {
        assert_eq!(
            escape("token rejected\nlevel=ERROR forged"),
            r#""token rejected\nlevel=ERROR forged""#
        );
        assert_eq!(escape("a\u{1b}[31mred\" q=1"), r#""a\u{1b}[31mred\" q=1""#);
        let long = escape(&"é".repeat(1000));
        assert_eq!(long.chars().count(), MAX_LOGGED + 2 + 3);
        assert!(long.ends_with("\"..."), "{long}");
    }
}
