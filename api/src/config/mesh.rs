//! The `Mesh` kind (`isthmus.io/v1`): mesh-wide settings, in the shape of
//! Istio's MeshConfig where Istio has one. Today that is the trust domain
//! and `pathNormalization`, which decides how every sidecar, Envoy or
//! isthmus-proxy, rewrites a request's path before authorisation, routing
//! and forwarding (Istio's `ProxyPathNormalization`). The primary carries
//! the choice to Envoy as HTTP connection manager fields and to
//! isthmus-proxy as route configuration metadata under
//! [`PATH_NORMALIZATION_METADATA`].

use serde::{Deserialize, Serialize};

/// The filter-metadata namespace of route configurations under which the
/// primary states the mesh's path normalisation, as
/// `{"pathNormalization": "DECODE_AND_MERGE_SLASHES"}`. Envoy ignores it;
/// isthmus-proxy, which reads no listeners, follows it.
pub const PATH_NORMALIZATION_METADATA: &str = "isthmus.io";
/// The field under [`PATH_NORMALIZATION_METADATA`].
pub const PATH_NORMALIZATION_FIELD: &str = "pathNormalization";

/// How a sidecar normalises request paths, Istio's options. Each includes
/// the ones before it:
/// - `NONE`: the path is used and forwarded as received.
/// - `BASE`: RFC 3986 normalisation as Envoy's `normalize_path` does it:
///   percent-encoded unreserved characters decoded, `\` made `/`, `.` and
///   `..` segments removed; `%00` refused.
/// - `MERGE_SLASHES`: then runs of `/` merged into one.
/// - `DECODE_AND_MERGE_SLASHES` (the default): first `%2F`, `%2f`, `%5C`
///   and `%5c` decoded to `/` and `\` (Envoy's `UNESCAPE_AND_FORWARD`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    None,
    Base,
    MergeSlashes,
    #[default]
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub const ALL: [PathNormalization; 4] = [
        Self::None,
        Self::Base,
        Self::MergeSlashes,
        Self::DecodeAndMergeSlashes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    /// Istio's name for an option; `DEFAULT` is Isthmus's default,
    /// `DECODE_AND_MERGE_SLASHES` (Istio's own default is `BASE`).
    pub fn parse(name: &str) -> Option<Self> {
        if name == "DEFAULT" {
            return Some(Self::default());
        }
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// RFC 3986 normalisation (Envoy's `normalize_path`).
    pub fn normalizes(self) -> bool {
        self != Self::None
    }

    /// Runs of slashes merged (Envoy's `merge_slashes`).
    pub fn merges_slashes(self) -> bool {
        matches!(self, Self::MergeSlashes | Self::DecodeAndMergeSlashes)
    }

    /// `%2F` and `%5C` decoded (Envoy's `UNESCAPE_AND_FORWARD`).
    pub fn decodes_slashes(self) -> bool {
        self == Self::DecodeAndMergeSlashes
    }
}

/// A `Mesh` object's spec.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    pub trust_domain: Option<String>,
    /// As in Istio's MeshConfig: `pathNormalization: {normalization: NAME}`.
    pub path_normalization: Option<PathNormalizationSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PathNormalizationSpec {
    pub normalization: Option<String>,
}

impl MeshSpec {
    /// The option this object sets, if it sets a valid one.
    pub fn path_normalization(&self) -> Option<PathNormalization> {
        self.path_normalization
            .as_ref()?
            .normalization
            .as_deref()
            .and_then(PathNormalization::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_default_is_decode_and_merge() {
        for p in PathNormalization::ALL {
            assert_eq!(PathNormalization::parse(p.as_str()), Some(p));
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::json!(p.as_str())
            );
        }
        assert_eq!(
            PathNormalization::default(),
            PathNormalization::DecodeAndMergeSlashes
        );
        assert_eq!(
            PathNormalization::parse("DEFAULT"),
            Some(PathNormalization::DecodeAndMergeSlashes)
        );
        assert_eq!(PathNormalization::parse("base"), None);
    }

    #[test]
    fn spec_reads_istio_shape() {
        let spec: MeshSpec = serde_json::from_value(
            serde_json::json!({"pathNormalization": {"normalization": "MERGE_SLASHES"}}),
        )
        .unwrap();
        assert_eq!(
            spec.path_normalization(),
            Some(PathNormalization::MergeSlashes)
        );
        let none: MeshSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(none.path_normalization(), None);
    }

    #[test]
    fn validation_names_the_field_and_the_options() {
        let resource = |name: &str| crate::config::Resource {
            api_version: "isthmus.io/v1".into(),
            kind: "Mesh".into(),
            metadata: crate::config::Metadata {
                name: "mesh".into(),
                ..Default::default()
            },
            spec: serde_json::json!({"pathNormalization": {"normalization": name}}),
        };
        let ctx = crate::config::Context::default();
        let errors = crate::config::istio::validate_spec(&resource("SLASHES"), &ctx);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "spec.pathNormalization.normalization");
        assert!(
            errors[0].message.contains("DECODE_AND_MERGE_SLASHES"),
            "{}",
            errors[0].message
        );
        for ok in ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"] {
            assert!(crate::config::istio::validate_spec(&resource(ok), &ctx).is_empty());
        }
    }
}
