//! The OpenAPI document of the REST API, served at `/api/v1/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Isthmus primary API", description = "Cluster registry, mesh config (Istio kinds), CA operations and status. Every /api/v1 call but openapi.json, ca/roots and trust-bundle needs the admin bearer token."),
    paths(
        crate::api::register_cluster,
        crate::api::list_clusters,
        crate::api::get_cluster,
        crate::api::deregister_cluster,
        crate::api::list_proxies,
        crate::api::roots,
        crate::api::leader,
        crate::api::ca_status,
        crate::api::rotate_root,
        crate::api::import_root,
        crate::api::rotate_intermediate,
        crate::api::trust_bundle,
        crate::api::federate,
        crate::api::unfederate,
        crate::config_api::apply,
        crate::config_api::list,
        crate::config_api::get_one,
        crate::config_api::delete_one,
    ),
    components(schemas(
        isthmus_api::rest::RegisterCluster,
        isthmus_api::rest::Registered,
        isthmus_api::rest::ClusterView,
        isthmus_api::rest::ErrorBody,
        isthmus_api::rest::LeaderView,
        isthmus_api::rest::CaView,
        isthmus_api::rest::RootView,
        isthmus_api::rest::IntermediateView,
        isthmus_api::rest::RotationView,
        isthmus_api::rest::RotateRoot,
        isthmus_api::rest::ImportRoot,
        isthmus_api::rest::FederatedView,
        isthmus_api::config::Resource,
        isthmus_api::config::Metadata,
        crate::config_api::Invalid,
        crate::config_api::Detail,
    )),
    modifiers(&Bearer)
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
