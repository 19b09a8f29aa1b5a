//! Hands an agent's stream to tonic in small pieces.
//!
//! tonic reads a stream into one buffer per stream, which grows to hold the message being
//! read plus the HTTP/2 DATA frame that brought it (up to 16 KiB), and never shrinks. After a
//! spool replay, when an agent sends batches back to back in full frames, every connected
//! node kept ~27 KiB there (heaptrack, BENCHMARKS.md). Cutting each frame into pieces of at
//! most [`PIECE_BYTES`] (no copy: `Bytes::split_to`) bounds that buffer by the largest
//! message plus one piece.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// Largest piece of a DATA frame handed to tonic.
pub const PIECE_BYTES: usize = 2048;

/// A request body whose data frames come in pieces of at most `piece` bytes.
#[derive(Debug)]
pub struct Rechunked {
    inner: Body,
    rest: Bytes,
    piece: usize,
}

impl Rechunked {
    /// Wraps `inner`; `piece` is at least 1.
    #[must_use]
    pub fn new(inner: Body, piece: usize) -> Self {
        Self {
            inner,
            rest: Bytes::new(),
            piece: piece.max(1),
        }
    }

    fn cut(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > self.piece {
            self.rest = data.split_off(self.piece);
        }
        data
    }
}

impl http_body::Body for Rechunked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(Frame::data(this.cut(rest)))));
        }
        Poll::Ready(match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => Some(Ok(match frame.into_data() {
                Ok(data) => Frame::data(this.cut(data)),
                Err(trailers) => trailers,
            })),
            other => other,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// A gRPC service whose requests' bodies are [`Rechunked`] by [`PIECE_BYTES`].
#[derive(Debug, Clone)]
pub struct RechunkedService<S>(pub S);

impl<S: NamedService> NamedService for RechunkedService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for RechunkedService<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.0
            .call(request.map(|body| Body::new(Rechunked::new(body, PIECE_BYTES))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn frames_come_in_pieces_with_every_byte_in_order_and_the_trailers_kept() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![
            Ok::<_, tonic::Status>(Frame::data(Bytes::copy_from_slice(&bytes[..7_000]))),
            Ok(Frame::data(Bytes::copy_from_slice(&bytes[7_000..7_010]))),
            Ok(Frame::data(Bytes::copy_from_slice(&bytes[7_010..]))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let inner = Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
        let mut body = Rechunked::new(inner, 2048);
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("a frame");
            match frame.into_data() {
                Ok(data) => {
                    sizes.push(data.len());
                    seen.extend_from_slice(&data);
                }
                Err(frame) => got_trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(sizes, [2048, 2048, 2048, 856, 10, 2048, 942]);
        assert_eq!(seen, bytes);
        assert_eq!(got_trailers, Some(trailers));
        assert!(body.frame().await.is_none(), "the end stays the end");
    }
}
