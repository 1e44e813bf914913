//! AuthorizationPolicy as Envoy RBAC on a sidecar's inbound filter chains.
//!
//! The policies that apply to a workload are those of its namespace (its
//! SVID's) and of the root namespace, `istio-system`, whose `selector`
//! labels (if any) the workload's labels hold; the workload's labels are
//! those its cluster's registry lists for the proxy's `INSTANCE_IP`. As in
//! Istio, DENY is checked first, then ALLOW: if any ALLOW policy applies, a
//! request must match one of its rules, so an ALLOW policy without rules
//! denies everything. AUDIT policies change nothing.
//!
//! Each chain serves one app port, so `ports` are settled here: a rule
//! whose operations all name other ports is left out. The rest of a rule
//! (sources, methods, paths, `when` conditions) becomes one RBAC principal,
//! and a filter's rules are the principals of its one policy. One policy
//! per filter keeps the encoding stable: the RBAC policy map is a protobuf
//! map, which would be encoded in random order.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::rbac::v3::principal::{self, Authenticated, Identifier};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, rbac::Action,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use isthmus_api::config::istio::{AuthorizationPolicy, AuthzRule};

use super::generate::{NodeInfo, any};
use crate::model::Model;
use crate::records::ClusterRecord;

const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// Policies here apply in every namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The RBAC filters for the inbound chain of app `port`: a DENY filter if
/// any DENY policy applies, then an ALLOW filter if any ALLOW policy does.
pub fn inbound_filters(
    model: &Model,
    me: &ClusterRecord,
    node: &NodeInfo,
    port: u16,
) -> Vec<HttpFilter> {
    let Some(namespace) = node.namespace.as_deref() else {
        return Vec::new();
    };
    let labels = workload_labels(model, me, node, namespace);
    let applies = |(ns, _, p): &&(String, String, AuthorizationPolicy)| {
        (ns == namespace || ns == ROOT_NAMESPACE)
            && p.selector
                .as_ref()
                .filter(|s| !s.match_labels.is_empty())
                .is_none_or(|s| {
                    s.match_labels
                        .iter()
                        .all(|(k, v)| labels.get(k.as_str()) == Some(&v.as_str()))
                })
    };
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let mut any_allow = false;
    for (_, _, policy) in model.authorization_policies.iter().filter(applies) {
        let rules = policy.rules.iter().filter_map(|r| rule(r, port));
        match policy.action.as_deref() {
            Some("DENY") => deny.extend(rules),
            Some("AUDIT") | Some("CUSTOM") => {}
            _ => {
                any_allow = true;
                allow.extend(rules);
            }
        }
    }
    let mut filters = Vec::new();
    if !deny.is_empty() {
        filters.push(filter("deny", Action::Deny, deny));
    }
    if any_allow {
        filters.push(filter("allow", Action::Allow, allow));
    }
    filters
}

/// The labels of the workload at the proxy's address, in its namespace.
pub(crate) fn workload_labels<'m>(
    model: &'m Model,
    me: &ClusterRecord,
    node: &NodeInfo,
    namespace: &str,
) -> HashMap<&'m str, &'m str> {
    let Some(ip) = node.instance_ip.as_deref() else {
        return HashMap::new();
    };
    model
        .services
        .values()
        .filter_map(|by_cluster| by_cluster.get(&me.name))
        .filter(|svc| svc.namespace == namespace)
        .flat_map(|svc| svc.endpoints.iter())
        .filter(|e| e.address == ip)
        .flat_map(|e| e.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect()
}

fn filter(name: &str, action: Action, principals: Vec<Principal>) -> HttpFilter {
    let mut policies = HashMap::new();
    if !principals.is_empty() {
        policies.insert(
            name.to_string(),
            Policy {
                permissions: vec![Permission {
                    rule: Some(permission::Rule::Any(true)),
                }],
                principals,
                ..Default::default()
            },
        );
    }
    let config = RbacFilter {
        rules: Some(Rbac {
            action: action as i32,
            policies,
            ..Default::default()
        }),
        ..Default::default()
    };
    HttpFilter {
        name: format!("envoy.filters.http.rbac.{name}"),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(RBAC, &config))),
        ..Default::default()
    }
}

/// One rule as one principal, or None if it cannot match on this port.
fn rule(r: &AuthzRule, port: u16) -> Option<Principal> {
    let mut all = Vec::new();
    let sources: Vec<Principal> = r
        .from
        .iter()
        .map(|f| {
            let Some(s) = &f.source else {
                return id_any();
            };
            let mut each = Vec::new();
            push_set(&mut each, &s.principals, &s.not_principals, |v| {
                principal(v)
            });
            push_set(&mut each, &s.namespaces, &s.not_namespaces, |v| {
                namespace(v)
            });
            and(each)
        })
        .collect();
    if !sources.is_empty() {
        all.push(or(sources));
    }
    let port = port.to_string();
    let operations: Vec<Principal> = r
        .to
        .iter()
        .filter_map(|t| {
            let Some(op) = &t.operation else {
                return Some(id_any());
            };
            if (!op.ports.is_empty() && !op.ports.contains(&port)) || op.not_ports.contains(&port) {
                return None;
            }
            let mut each = Vec::new();
            push_set(&mut each, &op.methods, &op.not_methods, |v| {
                header(":method", v)
            });
            push_set(&mut each, &op.paths, &op.not_paths, path);
            Some(and(each))
        })
        .collect();
    if !r.to.is_empty() {
        if operations.is_empty() {
            return None;
        }
        all.push(or(operations));
    }
    for c in &r.when {
        let to_id: Box<dyn Fn(&str) -> Principal> = match (c.key.as_str(), c.header()) {
            ("source.principal", _) => Box::new(principal),
            ("source.namespace", _) => Box::new(namespace),
            (_, Some(h)) => {
                let h = h.to_ascii_lowercase();
                Box::new(move |v| header(&h, v))
            }
            // Validation refuses other keys; a stored one can never match.
            _ => return None,
        };
        push_set(&mut all, &c.values, &c.not_values, to_id);
    }
    Some(and(all))
}

/// `values` (any of) and not `not_values` (none of), onto `each`.
fn push_set(
    each: &mut Vec<Principal>,
    values: &[String],
    not_values: &[String],
    to_id: impl Fn(&str) -> Principal,
) {
    if !values.is_empty() {
        each.push(or(values.iter().map(|v| to_id(v)).collect()));
    }
    if !not_values.is_empty() {
        each.push(Principal {
            identifier: Some(Identifier::NotId(Box::new(or(not_values
                .iter()
                .map(|v| to_id(v))
                .collect())))),
        });
    }
}

fn id_any() -> Principal {
    Principal {
        identifier: Some(Identifier::Any(true)),
    }
}

fn and(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => id_any(),
        1 => ids.remove(0),
        _ => Principal {
            identifier: Some(Identifier::AndIds(principal::Set { ids })),
        },
    }
}

fn or(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        1 => ids.remove(0),
        _ => Principal {
            identifier: Some(Identifier::OrIds(principal::Set { ids })),
        },
    }
}

/// Istio's value syntax: exact, `prefix*`, `*suffix`, or `*`.
fn matcher(value: &str, prefix: &str) -> Option<StringMatcher> {
    let pattern = if value == "*" {
        return None;
    } else if let Some(p) = value.strip_suffix('*') {
        MatchPattern::Prefix(format!("{prefix}{p}"))
    } else if let Some(s) = value.strip_prefix('*') {
        MatchPattern::Suffix(s.to_string())
    } else {
        MatchPattern::Exact(format!("{prefix}{value}"))
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

/// A peer's SPIFFE ID, as Istio writes it: `TRUST_DOMAIN/ns/NS/sa/SA`.
fn principal(value: &str) -> Principal {
    match matcher(value, "spiffe://") {
        None => id_any(),
        Some(m) => authenticated(m),
    }
}

/// Any peer of the namespace (validation keeps it a DNS label, so it is
/// safe in a regex).
fn namespace(value: &str) -> Principal {
    let ns = if value == "*" {
        "[^/]+".to_string()
    } else if let Some(p) = value.strip_suffix('*') {
        format!("{p}[^/]*")
    } else if let Some(s) = value.strip_prefix('*') {
        format!("[^/]*{s}")
    } else {
        value.to_string()
    };
    authenticated(StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
            regex: format!("^spiffe://[^/]+/ns/{ns}/sa/[^/]+$"),
            ..Default::default()
        })),
        ..Default::default()
    })
}

fn authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(Identifier::Authenticated(Authenticated {
            principal_name: Some(m),
        })),
    }
}

fn header(name: &str, value: &str) -> Principal {
    let specifier = match matcher(value, "") {
        None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        Some(m) => header_matcher::HeaderMatchSpecifier::StringMatch(m),
    };
    Principal {
        identifier: Some(Identifier::Header(HeaderMatcher {
            name: name.to_string(),
            header_match_specifier: Some(specifier),
            ..Default::default()
        })),
    }
}

fn path(value: &str) -> Principal {
    match matcher(value, "") {
        None => id_any(),
        Some(m) => Principal {
            identifier: Some(Identifier::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(m)),
            })),
        },
    }
}
