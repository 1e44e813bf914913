//! The xDS server: Envoy v3 Aggregated Discovery Service.
//!
//! [`generate`] turns the model into resources for one proxy; [`ads`] runs
//! the State-of-the-World protocol (versions, nonces, ACK and NACK) on each
//! stream and pushes when the model changes; [`status`] records what every
//! proxy has ACKed or NACKed for operators.

pub mod ads;
pub mod authz;
pub mod delta;
pub mod generate;
pub mod server;
pub mod sidecar;
pub mod status;
