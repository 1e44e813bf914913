//! The ADS service on the wire: envoy-types' generated routing for the two
//! ADS methods, with a codec of small buffers.
//!
//! tonic keeps an encode buffer per stream that grows to its largest write
//! (up to 32 KiB of batched messages by default) and a decode buffer of
//! 8 KiB, for the life of the stream. xDS streams live for days and are
//! idle nearly always, so at a thousand proxies those buffers were a third
//! of the primary's memory. Here a stream starts from 1 KiB buffers and
//! yields to the transport every 8 KiB.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::future::BoxFuture;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use super::ads::AdsService;

/// A stream's encode and decode buffers start at this many bytes.
const BUFFER: usize = 1024;
/// Encoded bytes after which a stream hands its buffer to the transport.
const YIELD_AT: usize = 8 * 1024;

/// Requests of at most this many bytes; a subscription to ten thousand
/// names fits with room to spare.
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// prost encoding with small buffers.
struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_AT))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_AT))
    }
}

/// The AggregatedDiscoveryService, routed by method.
#[derive(Clone)]
pub struct AdsServer(pub Arc<AdsService>);

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

struct Sotw(Arc<AdsService>);
struct Delta(Arc<AdsService>);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = DiscoveryResponse;
    type ResponseStream =
        <AdsService as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, tonic::Status>>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.stream_aggregated_resources(request).await })
    }
}

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream =
        <AdsService as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, tonic::Status>>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.delta_aggregated_resources(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for AdsServer
where
    B: Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ads = self.0.clone();
        match req.uri().path().rsplit('/').next() {
            Some("StreamAggregatedResources") => Box::pin(async move {
                let mut grpc =
                    Grpc::new(SmallBuffers(PhantomData)).max_decoding_message_size(MAX_REQUEST);
                Ok(grpc.streaming(Sotw(ads), req).await)
            }),
            Some("DeltaAggregatedResources") => Box::pin(async move {
                let mut grpc =
                    Grpc::new(SmallBuffers(PhantomData)).max_decoding_message_size(MAX_REQUEST);
                Ok(grpc.streaming(Delta(ads), req).await)
            }),
            _ => Box::pin(
                async move { Ok(tonic::Status::unimplemented("no such method").into_http()) },
            ),
        }
    }
}
