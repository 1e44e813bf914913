//! Envoy's HTTP RBAC, evaluated by isthmus-proxy: the subset of
//! `envoy.config.rbac.v3` the primary writes for AuthorizationPolicy
//! (`primary/src/xds/authz.rs`), compiled once when a route configuration
//! arrives and then checked per request without allocating.
//!
//! Semantics are Envoy's: a policy matches when one of its permissions and
//! one of its principals match; under ALLOW a request passes if some policy
//! matches, under DENY if none does. A rule kind outside the subset is a
//! decode error, so the response is NACKed and the last good rules stay in
//! force: an unknown rule never silently allows.

use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Principal, Rbac as RbacProto, permission, principal, rbac::Action,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use regex::Regex;

/// One compiled RBAC configuration.
#[derive(Debug, Clone)]
pub struct Rbac {
    deny: bool,
    /// Each policy: (some permission matches) and (some principal matches).
    policies: Vec<(Rule, Rule)>,
}

/// What a rule can see of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's SPIFFE ID from its verified certificate.
    pub peer: Option<&'a str>,
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub authority: &'a str,
    pub port: u16,
    pub headers: &'a http::HeaderMap,
}

/// Permissions and principals share one rule tree.
#[derive(Debug, Clone)]
pub(crate) enum Rule {
    Any,
    All(Vec<Rule>),
    AnyOf(Vec<Rule>),
    Not(Box<Rule>),
    /// The peer's authenticated principal (its URI SAN); no matcher means
    /// any authenticated peer.
    Peer(Option<Text>),
    Header {
        name: String,
        test: Option<Text>,
        invert: bool,
    },
    Path(Text),
    Port(u16),
}

#[derive(Debug, Clone)]
pub(crate) enum Text {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

impl Rbac {
    pub fn from_proto(rbac: &RbacProto) -> Result<Self, String> {
        let deny = match Action::try_from(rbac.action) {
            Ok(Action::Allow) => false,
            Ok(Action::Deny) => true,
            _ => return Err(format!("RBAC action {} is not supported", rbac.action)),
        };
        // Policies are a map; sort by name so evaluation order is stable.
        let mut named: Vec<_> = rbac.policies.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let policies = named
            .into_iter()
            .map(|(name, p)| {
                if p.condition.is_some() || p.checked_condition.is_some() {
                    return Err(format!("RBAC policy {name}: conditions are not supported"));
                }
                let named = |e: String| format!("RBAC policy {name}: {e}");
                Ok((
                    Rule::AnyOf(rules(&p.permissions, permission).map_err(named)?),
                    Rule::AnyOf(rules(&p.principals, principal).map_err(named)?),
                ))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { deny, policies })
    }

    /// Whether the request may pass.
    pub fn allows(&self, req: &Request) -> bool {
        let matched = self
            .policies
            .iter()
            .any(|(perm, princ)| perm.holds(req) && princ.holds(req));
        matched != self.deny
    }
}

impl Rule {
    pub(crate) fn holds(&self, req: &Request) -> bool {
        match self {
            Rule::Any => true,
            Rule::All(rules) => rules.iter().all(|r| r.holds(req)),
            Rule::AnyOf(rules) => rules.iter().any(|r| r.holds(req)),
            Rule::Not(rule) => !rule.holds(req),
            Rule::Peer(m) => req
                .peer
                .is_some_and(|p| m.as_ref().is_none_or(|m| m.holds(p))),
            Rule::Header { name, test, invert } => {
                let found =
                    header(req, name).is_some_and(|v| test.as_ref().is_none_or(|t| t.holds(&v)));
                found != *invert
            }
            Rule::Path(m) => m.holds(req.path),
            Rule::Port(p) => req.port == *p,
        }
    }
}

/// A header's value as Envoy's matchers see it: pseudo-headers from the
/// request line, repeated headers joined with commas.
fn header<'a>(req: &Request<'a>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    match name {
        ":method" => Some(Cow::Borrowed(req.method)),
        ":path" => Some(Cow::Borrowed(req.path)),
        ":authority" | "host" => Some(Cow::Borrowed(req.authority)),
        _ => {
            let mut values = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok());
            let first = values.next()?;
            let rest: Vec<&str> = values.collect();
            if rest.is_empty() {
                Some(Cow::Borrowed(first))
            } else {
                Some(Cow::Owned(
                    std::iter::once(first)
                        .chain(rest)
                        .collect::<Vec<_>>()
                        .join(","),
                ))
            }
        }
    }
}

impl Text {
    pub(crate) fn holds(&self, value: &str) -> bool {
        let fold = |s: &str, ci: bool| {
            if ci {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match self {
            Text::Exact(s, ci) => {
                if *ci {
                    value.eq_ignore_ascii_case(s)
                } else {
                    value == s
                }
            }
            Text::Prefix(s, ci) => fold(value, *ci).starts_with(s.as_str()),
            Text::Suffix(s, ci) => fold(value, *ci).ends_with(s.as_str()),
            Text::Contains(s, ci) => fold(value, *ci).contains(s.as_str()),
            Text::Regex(r) => r.is_match(value),
        }
    }
}

pub(crate) fn text(m: &StringMatcher) -> Result<Text, String> {
    let ci = m.ignore_case;
    let fold = |s: &str| {
        if ci {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        }
    };
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Text::Exact(s.clone(), ci),
        Some(MatchPattern::Prefix(s)) => Text::Prefix(fold(s), ci),
        Some(MatchPattern::Suffix(s)) => Text::Suffix(fold(s), ci),
        Some(MatchPattern::Contains(s)) => Text::Contains(fold(s), ci),
        // Envoy's safe_regex must match the whole value.
        Some(MatchPattern::SafeRegex(r)) => Text::Regex(
            Regex::new(&format!("^(?:{})$", r.regex))
                .map_err(|e| format!("regex {:?}: {e}", r.regex))?,
        ),
        Some(MatchPattern::Custom(_)) => {
            return Err("custom string matchers are not supported".into());
        }
        None => return Err("string matcher without a pattern".into()),
    })
}

fn path(m: &PathMatcher) -> Result<Rule, String> {
    match &m.rule {
        Some(path_matcher::Rule::Path(s)) => Ok(Rule::Path(text(s)?)),
        None => Err("path matcher without a rule".into()),
    }
}

pub(crate) fn header_rule(h: &HeaderMatcher) -> Result<Rule, String> {
    use header_matcher::HeaderMatchSpecifier as S;
    let test = match &h.header_match_specifier {
        Some(S::StringMatch(m)) => Some(text(m)?),
        Some(S::PresentMatch(true)) => None,
        _ => {
            return Err(format!(
                "header {}: this kind of header match is not supported",
                h.name
            ));
        }
    };
    Ok(Rule::Header {
        name: h.name.to_ascii_lowercase(),
        test,
        invert: h.invert_match,
    })
}

fn rules<T>(items: &[T], f: fn(&T) -> Result<Rule, String>) -> Result<Vec<Rule>, String> {
    items.iter().map(f).collect()
}

fn permission(p: &Permission) -> Result<Rule, String> {
    use permission::Rule as P;
    match &p.rule {
        Some(P::Any(true)) => Ok(Rule::Any),
        Some(P::AndRules(set)) => Ok(Rule::All(rules(&set.rules, permission)?)),
        Some(P::OrRules(set)) => Ok(Rule::AnyOf(rules(&set.rules, permission)?)),
        Some(P::NotRule(inner)) => Ok(Rule::Not(Box::new(permission(inner)?))),
        Some(P::Header(h)) => header_rule(h),
        Some(P::UrlPath(m)) => path(m),
        Some(P::DestinationPort(port)) => u16::try_from(*port)
            .map(Rule::Port)
            .map_err(|_| format!("destination port {port} is out of range")),
        _ => Err("this kind of RBAC permission is not supported".into()),
    }
}

fn principal(p: &Principal) -> Result<Rule, String> {
    use principal::Identifier as I;
    match &p.identifier {
        Some(I::Any(true)) => Ok(Rule::Any),
        Some(I::AndIds(set)) => Ok(Rule::All(rules(&set.ids, principal)?)),
        Some(I::OrIds(set)) => Ok(Rule::AnyOf(rules(&set.ids, principal)?)),
        Some(I::NotId(inner)) => Ok(Rule::Not(Box::new(principal(inner)?))),
        Some(I::Authenticated(a)) => {
            Ok(Rule::Peer(a.principal_name.as_ref().map(text).transpose()?))
        }
        Some(I::Header(h)) => header_rule(h),
        Some(I::UrlPath(m)) => path(m),
        _ => Err("this kind of RBAC principal is not supported".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::rbac::v3::{Policy, principal::Authenticated};
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;

    use super::*;

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(MatchPattern::Exact(s.into())),
            ..Default::default()
        }
    }

    fn id(i: principal::Identifier) -> Principal {
        Principal {
            identifier: Some(i),
        }
    }

    fn allow(principals: Vec<Principal>) -> Rbac {
        Rbac::from_proto(&RbacProto {
            action: Action::Allow as i32,
            policies: HashMap::from([(
                "p".to_string(),
                Policy {
                    permissions: vec![Permission {
                        rule: Some(permission::Rule::Any(true)),
                    }],
                    principals,
                    ..Default::default()
                },
            )]),
            ..Default::default()
        })
        .unwrap()
    }

    fn req<'a>(
        peer: &'a str,
        method: &'a str,
        path: &'a str,
        headers: &'a http::HeaderMap,
    ) -> Request<'a> {
        Request {
            peer: Some(peer),
            method,
            path,
            authority: "echo:8080",
            port: 8080,
            headers,
        }
    }

    #[test]
    fn namespace_regex_deny_path_and_header_condition() {
        let in_demo = id(principal::Identifier::Authenticated(Authenticated {
            principal_name: Some(StringMatcher {
                match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                    regex: "spiffe://[^/]+/ns/demo/sa/[^/]+".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        }));
        let not_secret = id(principal::Identifier::NotId(Box::new(id(
            principal::Identifier::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(StringMatcher {
                    match_pattern: Some(MatchPattern::Prefix("/secret".into())),
                    ..Default::default()
                })),
            }),
        ))));
        let get_with_pass = id(principal::Identifier::AndIds(principal::Set {
            ids: vec![
                id(principal::Identifier::Header(HeaderMatcher {
                    name: ":method".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(exact("GET")),
                    ),
                    ..Default::default()
                })),
                id(principal::Identifier::Header(HeaderMatcher {
                    name: "x-pass".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(exact("yes")),
                    ),
                    ..Default::default()
                })),
            ],
        }));
        let rbac = allow(vec![id(principal::Identifier::AndIds(principal::Set {
            ids: vec![in_demo, not_secret, get_with_pass],
        }))]);
        let mut pass = http::HeaderMap::new();
        pass.insert("x-pass", http::HeaderValue::from_static("yes"));
        let none = http::HeaderMap::new();
        let client = "spiffe://cluster.local/ns/demo/sa/client";
        assert!(rbac.allows(&req(client, "GET", "/", &pass)));
        assert!(!rbac.allows(&req(client, "GET", "/", &none)), "no x-pass");
        assert!(!rbac.allows(&req(client, "POST", "/", &pass)), "not a GET");
        assert!(
            !rbac.allows(&req(client, "GET", "/secret/x", &pass)),
            "denied path"
        );
        assert!(
            !rbac.allows(&req(
                "spiffe://cluster.local/ns/prod/sa/client",
                "GET",
                "/",
                &pass
            )),
            "other namespace"
        );
        // The regex is anchored: a longer ID with the same middle fails.
        assert!(!rbac.allows(&req(
            "spiffe://cluster.local/ns/demo/sa/a/b",
            "GET",
            "/",
            &pass
        )));
        let mut anonymous = req(client, "GET", "/", &pass);
        anonymous.peer = None;
        assert!(!rbac.allows(&anonymous), "no authenticated peer");
    }

    #[test]
    fn deny_action_and_empty_allow() {
        let deny = Rbac::from_proto(&RbacProto {
            action: Action::Deny as i32,
            policies: HashMap::from([(
                "p".to_string(),
                Policy {
                    permissions: vec![Permission {
                        rule: Some(permission::Rule::DestinationPort(8080)),
                    }],
                    principals: vec![id(principal::Identifier::Any(true))],
                    ..Default::default()
                },
            )]),
            ..Default::default()
        })
        .unwrap();
        let h = http::HeaderMap::new();
        let mut r = req("spiffe://td/ns/a/sa/b", "GET", "/", &h);
        assert!(!deny.allows(&r));
        r.port = 9090;
        assert!(deny.allows(&r));
        // ALLOW with no policies allows nothing, as in Envoy.
        let nothing = Rbac::from_proto(&RbacProto::default()).unwrap();
        assert!(!nothing.allows(&r));
    }

    #[test]
    fn unsupported_rules_and_bad_regexes_are_refused_by_name() {
        let bad = RbacProto {
            policies: HashMap::from([(
                "p".to_string(),
                Policy {
                    permissions: vec![Permission {
                        rule: Some(permission::Rule::Any(true)),
                    }],
                    principals: vec![id(principal::Identifier::Authenticated(Authenticated {
                        principal_name: Some(StringMatcher {
                            match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                                regex: "(".into(),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }),
                    }))],
                    ..Default::default()
                },
            )]),
            ..Default::default()
        };
        let e = Rbac::from_proto(&bad).unwrap_err();
        assert!(e.contains("RBAC policy p: regex \"(\""), "{e}");
        let mut ip = bad.clone();
        if let Some(p) = ip.policies.get_mut("p") {
            p.principals = vec![id(
                principal::Identifier::DirectRemoteIp(Default::default()),
            )];
        }
        let e = Rbac::from_proto(&ip).unwrap_err();
        assert!(e.contains("principal is not supported"), "{e}");
    }
}
