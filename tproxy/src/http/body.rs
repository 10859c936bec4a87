//! Message bodies inside the proxy: one boxed type for everything, bodies
//! replayed after being partly or wholly read, bounded buffering for the
//! faults that need a whole body (JSON merge patch), and RFC 7396 itself.
//!
//! Bodies are streamed unless a fault needs the whole of one; a body larger
//! than the buffering limit is passed on unchanged, never held in memory.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use serde_json::Value;

use crate::error::BoxError;

/// Every body the proxy receives or sends.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest body buffered for a merge patch; bigger ones pass unchanged.
pub(crate) const MAX_PATCH_BODY: usize = 16 << 20;

pub(crate) fn incoming(b: hyper::body::Incoming) -> ProxyBody {
    b.map_err(BoxError::from).boxed_unsync()
}

pub(crate) fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Frames already read, then whatever is left of the body.
pub(crate) struct Replay {
    frames: VecDeque<Frame<Bytes>>,
    buffered: u64,
    rest: Option<ProxyBody>,
}

impl Replay {
    pub(crate) fn new(frames: VecDeque<Frame<Bytes>>, rest: Option<ProxyBody>) -> Replay {
        let buffered = frames
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum();
        Replay {
            frames,
            buffered,
            rest,
        }
    }

    pub(crate) fn boxed(self) -> ProxyBody {
        self.boxed_unsync()
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.frames.pop_front() {
            if let Some(d) = f.data_ref() {
                this.buffered -= d.len() as u64;
            }
            return Poll::Ready(Some(Ok(f)));
        }
        match this.rest.as_mut() {
            Some(r) => Pin::new(r).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.rest {
            None => SizeHint::with_exact(self.buffered),
            Some(r) => {
                let h = r.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + self.buffered);
                if let Some(u) = h.upper() {
                    out.set_upper(u + self.buffered);
                }
                out
            }
        }
    }
}

/// A body read up to a limit.
pub(crate) enum Collected {
    /// The whole body, and its trailers if it had any.
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Larger than the limit: the same body, to pass on unchanged.
    TooLarge(ProxyBody),
}

/// Reads `body` whole if it is at most `limit` bytes.
pub(crate) async fn collect_limited(
    mut body: ProxyBody,
    limit: usize,
) -> Result<Collected, BoxError> {
    if body.size_hint().lower() > limit as u64 {
        return Ok(Collected::TooLarge(body));
    }
    let mut frames = VecDeque::new();
    let mut len = 0usize;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(d) = frame.data_ref() {
            len += d.len();
            frames.push_back(frame);
            if len > limit {
                return Ok(Collected::TooLarge(Replay::new(frames, Some(body)).boxed()));
            }
        } else if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    let mut data = BytesMut::with_capacity(len);
    for f in frames {
        if let Some(d) = f.data_ref() {
            data.extend_from_slice(d);
        }
    }
    Ok(Collected::Whole {
        data: data.freeze(),
        trailers,
    })
}

/// A body of `data` followed by `trailers`.
pub(crate) fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    let mut frames = VecDeque::with_capacity(2);
    if !data.is_empty() {
        frames.push_back(Frame::data(data));
    }
    if let Some(t) = trailers {
        frames.push_back(Frame::trailers(t));
    }
    Replay::new(frames, None).boxed()
}

/// Reads and discards up to `limit` bytes of a body; whether it ended.
pub(crate) async fn drain(mut body: ProxyBody, limit: usize) -> bool {
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    seen += d.len();
                    if seen > limit {
                        return false;
                    }
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Removes the headers that describe the old body's framing and coding, so
/// hyper frames the new body itself (`Content-Length` from its exact size).
pub(crate) fn forget_framing(headers: &mut HeaderMap, keep_encoding: bool) {
    headers.remove(CONTENT_LENGTH);
    headers.remove(TRANSFER_ENCODING);
    if !keep_encoding {
        headers.remove(CONTENT_ENCODING);
    }
}

/// Whether the headers describe a JSON body we can read: a JSON media type
/// (or none at all) and no content coding.
pub(crate) fn is_plain_json(headers: &HeaderMap) -> bool {
    if let Some(enc) = headers.get(CONTENT_ENCODING) {
        if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
            return false;
        }
    }
    match headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(ct) => {
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/json"
                || essence.ends_with("+json")
                || essence == "text/json"
                || essence == "application/x-json"
        }
    }
}

/// RFC 7396 JSON merge patch: applies `patch` to `target` in place.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The outcome of patching a body.
pub(crate) enum Patched {
    /// The new body; the caller fixes the framing headers.
    Changed(ProxyBody),
    /// Not JSON, too large, or empty: the body as it was.
    Unchanged(ProxyBody),
}

/// Applies a merge patch to a JSON body, buffering it (up to
/// [`MAX_PATCH_BODY`]).
pub(crate) async fn patch_json(body: ProxyBody, patch: &Value) -> Result<Patched, BoxError> {
    match collect_limited(body, MAX_PATCH_BODY).await? {
        Collected::TooLarge(b) => {
            tracing::warn!(
                limit = MAX_PATCH_BODY,
                "body too large to merge-patch; passed on unchanged"
            );
            Ok(Patched::Unchanged(b))
        }
        Collected::Whole { data, trailers } => {
            if data.iter().all(u8::is_ascii_whitespace) {
                return Ok(Patched::Unchanged(with_trailers(data, trailers)));
            }
            match serde_json::from_slice::<Value>(&data) {
                Ok(mut v) => {
                    merge_patch(&mut v, patch);
                    let out = serde_json::to_vec(&v)?;
                    Ok(Patched::Changed(with_trailers(Bytes::from(out), trailers)))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "body is not JSON; merge patch skipped");
                    Ok(Patched::Unchanged(with_trailers(data, trailers)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7396_examples() {
        // The table in RFC 7396, appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn json_media_types() {
        let mut h = HeaderMap::new();
        assert!(is_plain_json(&h));
        h.insert(
            CONTENT_TYPE,
            "application/json; charset=utf-8".parse().expect("value"),
        );
        assert!(is_plain_json(&h));
        h.insert(
            CONTENT_TYPE,
            "application/problem+json".parse().expect("value"),
        );
        assert!(is_plain_json(&h));
        h.insert(CONTENT_ENCODING, "gzip".parse().expect("value"));
        assert!(!is_plain_json(&h));
        h.remove(CONTENT_ENCODING);
        h.insert(CONTENT_TYPE, "text/html".parse().expect("value"));
        assert!(!is_plain_json(&h));
    }

    /// A body of chunks whose size is not known up front.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn collect_stops_at_the_limit_and_replays_everything() {
        let chunks = (0..10u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        let body = Chunks(chunks).boxed_unsync();
        let Collected::TooLarge(rest) = collect_limited(body, 2500).await.expect("collect") else {
            panic!("should be too large");
        };
        let all = rest.collect().await.expect("replay").to_bytes();
        assert_eq!(all.len(), 10_000);
        assert!(all
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| usize::from(*b) == i)));
        let small = Chunks((0..3u8).map(|i| Bytes::from(vec![i; 10])).collect()).boxed_unsync();
        let Collected::Whole { data, trailers } =
            collect_limited(small, 2500).await.expect("collect")
        else {
            panic!("should fit");
        };
        assert_eq!((data.len(), trailers), (30, None));
    }
}
