//! Isthmus topologies: the layout templates in `topologies/templates/`
//! ([`template`]) and the local runner behind `isthmusctl up` ([`runner`]),
//! which starts real processes, optionally in Linux network namespaces
//! ([`netns`]). It also holds the REST client for the primary ([`client`])
//! and small HTTP probes that work from inside a namespace ([`probe`]).

pub mod client;
pub mod component;
pub mod drill;
pub mod envoy;
pub mod inspect;
pub mod netns;
pub mod probe;
pub mod runner;
pub mod template;
