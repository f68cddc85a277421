//! A request body handed to HTTP/2 with its end already known.
//!
//! tonic encodes a unary request as a body that learns it is finished only
//! when polled once more after its message. hyper asks a body
//! `is_end_stream()` after each data frame: for tonic's body the answer is
//! still no, so the message goes out in one DATA frame and the end of the
//! stream in a second, empty one, each its own write on the socket and its
//! own wake-up of the server's connection task (seen with `strace` on the
//! gateway: three writes per call, HEADERS, DATA, empty DATA).
//!
//! [`at_once`] reads whatever the body has ready before the call is sent
//! (a unary message is encoded in place, so that is all of it) and hands on
//! a body that says it is done with its last frame: hyper then sets
//! END_STREAM on the DATA frame itself. A body that is not ready at once (a
//! stream) keeps its remainder and is passed on unchanged after the frames
//! already read.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use http_body::{Body as _, Frame};
use prost::bytes::Bytes;
use tonic::Status;
use tonic::body::Body;

/// `body` with the frames it has ready read out, ending with them when
/// they are all it had; see the module docs.
pub fn at_once(mut body: Body) -> Body {
    if body.is_end_stream() {
        return body;
    }
    let mut ready = VecDeque::new();
    // No one is woken by this context: a body that is not ready is polled
    // again, with hyper's context, once sent.
    let mut cx = Context::from_waker(Waker::noop());
    let rest = loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(frame)) => {
                let end = frame.is_err();
                ready.push_back(frame);
                if end {
                    break None;
                }
            }
            Poll::Ready(None) => break None,
            Poll::Pending => break Some(body),
        }
    };
    Body::new(AtOnce { ready, rest })
}

/// Frames read ahead, then what was left of the body (if anything).
struct AtOnce {
    ready: VecDeque<Result<Frame<Bytes>, Status>>,
    rest: Option<Body>,
}

impl http_body::Body for AtOnce {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.ready.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prost::Message;
    use tonic::codec::Codec as _;

    /// tonic's own unary request body for `message`, as `Grpc::unary`
    /// builds it.
    fn tonic_body(message: &str) -> Body {
        let mut codec = tonic_prost::ProstCodec::<String, String>::default();
        let encoded = tonic::codec::EncodeBody::new_client(
            codec.encoder(),
            tokio_stream::once(Ok(message.to_owned())),
            None,
            None,
        );
        Body::new(encoded)
    }

    #[tokio::test]
    async fn a_unary_body_ends_with_its_message() {
        let original = tonic_body("hello");
        assert!(!original.is_end_stream());
        let mut body = at_once(original);
        assert!(!body.is_end_stream(), "the message is still to be sent");
        let frame = body.frame().await.expect("a frame").expect("data");
        assert!(
            body.is_end_stream(),
            "known to be over with the message, so END_STREAM goes on its DATA frame"
        );
        // The gRPC frame: no compression, a 4-byte length, the message.
        let data = frame.into_data().expect("a data frame");
        let len = "hello".to_owned().encoded_len();
        assert_eq!(data[0], 0);
        assert_eq!(
            u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize,
            len
        );
        assert_eq!(String::decode(&data[5..]).expect("decodes"), "hello");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_not_ready_keeps_its_frames_in_order() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .expect("sent");
        let stream =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut body = at_once(Body::new(stream));
        assert!(!body.is_end_stream(), "more may come");
        let later = tokio::spawn(async move {
            tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
                .await
                .expect("sent");
        });
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.push(frame.expect("data").into_data().expect("data"));
        }
        later.await.expect("sender");
        assert_eq!(
            got,
            [Bytes::from_static(b"one"), Bytes::from_static(b"two")]
        );
    }

    #[tokio::test]
    async fn an_error_read_ahead_is_passed_on() {
        let stream = tokio_stream::iter([
            Ok(Frame::data(Bytes::from_static(b"one"))),
            Err(Status::internal("encoding failed")),
        ]);
        let mut body = at_once(Body::new(http_body_util::StreamBody::new(stream)));
        assert!(body.frame().await.expect("frame").is_ok());
        let err = body.frame().await.expect("frame").expect_err("the error");
        assert_eq!(err.message(), "encoding failed");
    }
}
