//! Inbound security on Envoy sidecars: AuthorizationPolicy as RBAC, and
//! PeerAuthentication modes.
//!
//! The policies that apply to a workload are those of its namespace (its
//! SVID's) and of the root namespace, `istio-system`, whose `selector`
//! labels (if any) the workload's labels hold; the workload's labels are
//! those its cluster's registry lists for the proxy's `INSTANCE_IP`. As in
//! Istio, DENY is checked first, then ALLOW: if any ALLOW policy applies, a
//! request must match one of its rules, so an ALLOW policy without rules
//! denies everything. AUDIT policies change nothing.
//!
//! Each inbound virtual host serves one app port, so `ports` are settled
//! here: a rule whose operations all name other ports is left out. The
//! rest of a rule (sources, methods, paths, `when` conditions) becomes one
//! RBAC principal. The rules travel in the inbound route configurations
//! (RDS), per virtual host; see [`filter`] for why.
//!
//! PeerAuthentication is here too: [`mtls_mode`] settles whether a port
//! takes mTLS, plaintext or both.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::rbac::v3::principal::{self, Authenticated, Identifier};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, rbac::Action,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{
    Rbac as RbacFilter, RbacPerRoute,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use isthmus_api::config::istio::{AuthorizationPolicy, AuthzRule, PeerAuthentication};

use super::generate::{NodeInfo, any};
use crate::model::Model;
use crate::records::ClusterRecord;

const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const RBAC_PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
/// The inbound RBAC filter's name, under which virtual hosts carry rules.
pub const FILTER: &str = "envoy.filters.http.rbac";

/// Policies here apply in every namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The rules that apply to requests for app `port`: DENY rules, and the
/// ALLOW rules if any ALLOW policy applies (`None` if none does).
struct PortRules {
    deny: Vec<Principal>,
    allow: Option<Vec<Principal>>,
}

fn port_rules(model: &Model, me: &ClusterRecord, node: &NodeInfo, port: u16) -> PortRules {
    let mut rules = PortRules {
        deny: Vec::new(),
        allow: None,
    };
    let Some(namespace) = node.namespace.as_deref() else {
        return rules;
    };
    let labels = workload_labels(model, me, node, namespace);
    let applies = |(ns, _, p): &&(String, String, AuthorizationPolicy)| {
        (ns == namespace || ns == ROOT_NAMESPACE)
            && p.selector
                .as_ref()
                .is_none_or(|s| labels_hold(&s.match_labels, &labels))
    };
    for (_, _, policy) in model.authorization_policies.iter().filter(applies) {
        let matched = policy.rules.iter().filter_map(|r| rule(r, port));
        match policy.action.as_deref() {
            Some("DENY") => rules.deny.extend(matched),
            Some("AUDIT") | Some("CUSTOM") => {}
            _ => rules.allow.get_or_insert_with(Vec::new).extend(matched),
        }
    }
    rules
}

/// Whether `labels` hold every label a selector requires (an empty one
/// requires none).
fn labels_hold(required: &BTreeMap<String, String>, labels: &HashMap<&str, &str>) -> bool {
    required
        .iter()
        .all(|(k, v)| labels.get(k.as_str()) == Some(&v.as_str()))
}

/// The config of a kind that applies to a workload, as Istio picks it for
/// PeerAuthentication and Sidecar: [the first in the workload's namespace
/// whose (non-empty) selector its labels hold, the first there without a
/// selector, the first in the root namespace without a selector].
pub(crate) fn most_specific<'a, T>(
    items: &'a [(String, String, T)],
    namespace: &str,
    labels: &HashMap<&str, &str>,
    selector: impl Fn(&T) -> Option<&BTreeMap<String, String>>,
) -> [Option<&'a (String, String, T)>; 3] {
    // None: no selector; Some(whether the labels hold it).
    let selected = |t: &T| {
        selector(t)
            .filter(|s| !s.is_empty())
            .map(|s| labels_hold(s, labels))
    };
    let wide = |in_ns: &str| {
        items
            .iter()
            .find(|(ns, _, t)| ns == in_ns && selected(t).is_none())
    };
    [
        items
            .iter()
            .find(|(ns, _, t)| ns == namespace && selected(t) == Some(true)),
        wide(namespace),
        wide(ROOT_NAMESPACE),
    ]
}

/// The RBAC filter of every inbound HTTP connection manager. It enforces
/// nothing itself; each inbound virtual host carries its port's rules (see
/// [`route_config`]), so a policy change is an RDS update that holds from
/// the next request on, even on connections opened before it. (Rules in
/// the listener would change its filter chains, and Envoy keeps serving the
/// open connections of a replaced chain with the old rules while it drains
/// them.)
pub fn filter() -> HttpFilter {
    HttpFilter {
        name: FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            RBAC,
            &RbacFilter::default(),
        ))),
        ..Default::default()
    }
}

/// The `typed_per_filter_config` of the inbound virtual host of app `port`:
/// none if no policy applies. DENY rules and ALLOW rules become one ALLOW
/// policy: not any DENY rule, and (if any ALLOW policy applies) some ALLOW
/// rule. One policy in one entry keeps the encoding stable, where protobuf
/// maps would be encoded in random order.
pub fn route_config(
    model: &Model,
    me: &ClusterRecord,
    node: &NodeInfo,
    port: u16,
) -> HashMap<String, envoy_types::pb::google::protobuf::Any> {
    let rules = port_rules(model, me, node, port);
    let mut all = Vec::new();
    if !rules.deny.is_empty() {
        all.push(Principal {
            identifier: Some(Identifier::NotId(Box::new(or(rules.deny)))),
        });
    }
    match rules.allow {
        None => {}
        // ALLOW policies without a rule for this port: nothing is allowed.
        Some(allow) if allow.is_empty() => all.push(Principal {
            identifier: Some(Identifier::NotId(Box::new(id_any()))),
        }),
        Some(allow) => all.push(or(allow)),
    }
    if all.is_empty() {
        return HashMap::new();
    }
    let policy = Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::Any(true)),
        }],
        principals: vec![and(all)],
        ..Default::default()
    };
    let config = RbacPerRoute {
        rbac: Some(RbacFilter {
            rules: Some(Rbac {
                action: Action::Allow as i32,
                policies: HashMap::from([("authorization-policies".to_string(), policy)]),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    HashMap::from([(FILTER.to_string(), any(RBAC_PER_ROUTE, &config))])
}

/// How app `port` of a workload takes connections, from PeerAuthentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Mesh mTLS only (the default: Isthmus's own clients always use it).
    Strict,
    /// mTLS, and plaintext from outside the mesh.
    Permissive,
    /// Plaintext only.
    Disable,
}

/// The mode of app `port`: the workload's own policy (its port-level mode,
/// then its mode), then its namespace's, then the root namespace's; a mode
/// of UNSET (or none) defers to the next. Strict if none sets one.
pub fn mtls_mode(model: &Model, me: &ClusterRecord, node: &NodeInfo, port: u16) -> MtlsMode {
    let Some(namespace) = node.namespace.as_deref() else {
        return MtlsMode::Strict;
    };
    let labels = workload_labels(model, me, node, namespace);
    let [workload, in_namespace, root] =
        most_specific(&model.peer_authentications, namespace, &labels, |p| {
            p.selector.as_ref().map(|s| &s.match_labels)
        });
    let port_level = workload
        .and_then(|(_, _, p)| p.port_level_mtls.get(&port.to_string()))
        .and_then(|m| m.mode.as_deref());
    let modes = [port_level, mode(workload), mode(in_namespace), mode(root)];
    match modes.into_iter().flatten().find(|m| *m != "UNSET") {
        Some("PERMISSIVE") => MtlsMode::Permissive,
        Some("DISABLE") => MtlsMode::Disable,
        _ => MtlsMode::Strict,
    }
}

/// A PeerAuthentication's workload-wide mode.
fn mode(p: Option<&(String, String, PeerAuthentication)>) -> Option<&str> {
    p.and_then(|(_, _, p)| p.mtls.as_ref()?.mode.as_deref())
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
