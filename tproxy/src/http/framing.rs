//! HTTP/1 message framing for the fast path (`fast.rs`): where a message's
//! head says its body ends, and a byte-by-byte account of how much of what
//! has arrived belongs to the body (RFC 9112, sections 6 and 7).
//!
//! Nothing here copies or rewrites: the fast path relays the bytes as they
//! came and only needs to know where each message ends.

/// The body still to come of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    /// Nothing (more): the message is complete.
    Done,
    /// This many bytes left (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked`, in this state.
    Chunked(Chunk),
    /// Until the server closes the connection (a response with neither
    /// length nor chunking).
    UntilClose,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// In a chunk's size: its value so far and how many hex digits.
    Size { size: u64, digits: u8 },
    /// After the size: extensions, whitespace or CR until the line's LF.
    Ext { size: u64 },
    /// This many data bytes of a chunk left.
    Data(u64),
    /// The CRLF after a chunk's data (`cr`: the CR has been seen).
    DataEnd { cr: bool },
    /// The trailer section after the last chunk; `empty` while the
    /// current line has nothing in it (an empty line ends the body).
    Trailer { empty: bool },
}

/// A chunked body that breaks the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub(crate) struct Malformed;

/// More hex digits than a u64 holds.
const MAX_SIZE_DIGITS: u8 = 15;

impl Body {
    /// A chunked body at its start.
    pub(crate) fn chunked() -> Body {
        Body::Chunked(Chunk::Size { size: 0, digits: 0 })
    }

    /// A body of `n` bytes.
    pub(crate) fn length(n: u64) -> Body {
        if n == 0 {
            Body::Done
        } else {
            Body::Length(n)
        }
    }

    /// Accounts for `data`, the next bytes on the connection: returns how
    /// many of them belong to this body (all of them, or up to its end).
    pub(crate) fn advance(&mut self, data: &[u8]) -> Result<usize, Malformed> {
        match self {
            Body::Done => Ok(0),
            Body::UntilClose => Ok(data.len()),
            Body::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= take as u64;
                if *left == 0 {
                    *self = Body::Done;
                }
                Ok(take)
            }
            Body::Chunked(c) => {
                let mut i = 0;
                while i < data.len() {
                    if let Chunk::Data(left) = c {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(data.len() - i);
                        *left -= take as u64;
                        i += take;
                        if *left == 0 {
                            *c = Chunk::DataEnd { cr: false };
                        }
                        continue;
                    }
                    let b = data[i];
                    i += 1;
                    if c.step(b)? {
                        *self = Body::Done;
                        return Ok(i);
                    }
                }
                Ok(i)
            }
        }
    }
}

impl Chunk {
    /// One byte outside chunk data; true when it ends the body.
    fn step(&mut self, b: u8) -> Result<bool, Malformed> {
        match *self {
            Chunk::Size { size, digits } => match hex(b) {
                Some(d) => {
                    if digits >= MAX_SIZE_DIGITS {
                        return Err(Malformed);
                    }
                    *self = Chunk::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    };
                }
                None if digits == 0 => return Err(Malformed),
                None if b == b'\n' => self.size_line_done(size),
                None if matches!(b, b';' | b' ' | b'\t' | b'\r') => *self = Chunk::Ext { size },
                None => return Err(Malformed),
            },
            Chunk::Ext { size } => {
                if b == b'\n' {
                    self.size_line_done(size);
                }
            }
            Chunk::DataEnd { cr } => match b {
                b'\r' if !cr => *self = Chunk::DataEnd { cr: true },
                b'\n' => *self = Chunk::Size { size: 0, digits: 0 },
                _ => return Err(Malformed),
            },
            Chunk::Trailer { empty } => match b {
                b'\n' if empty => return Ok(true),
                b'\n' => *self = Chunk::Trailer { empty: true },
                b'\r' => {}
                _ => *self = Chunk::Trailer { empty: false },
            },
            // `Body::advance` consumes data in bulk.
            Chunk::Data(_) => {}
        }
        Ok(false)
    }

    fn size_line_done(&mut self, size: u64) {
        *self = if size == 0 {
            Chunk::Trailer { empty: true }
        } else {
            Chunk::Data(size)
        };
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A `Content-Length` value: digits only (surrounding whitespace allowed).
pub(crate) fn content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether a comma-separated header value (`Connection`,
/// `Transfer-Encoding`) lists `token`, in any case.
pub(crate) fn has_token(v: &[u8], token: &str) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the last coding a `Transfer-Encoding` value lists is `chunked`.
pub(crate) fn ends_chunked(v: &[u8]) -> bool {
    v.rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `data` in pieces of `step` bytes; returns the bytes taken
    /// and whether the body ended.
    fn feed(mut body: Body, data: &[u8], step: usize) -> Result<(usize, bool), Malformed> {
        let mut taken = 0;
        for piece in data.chunks(step) {
            let n = body.advance(piece)?;
            taken += n;
            if n < piece.len() || body == Body::Done {
                break;
            }
        }
        Ok((taken, body == Body::Done))
    }

    #[test]
    fn chunked_bodies_end_where_their_last_chunk_and_trailers_end_in_any_pieces() {
        let cases: &[(&[u8], usize)] = &[
            (b"5\r\nhello\r\n0\r\n\r\nGET /next", 15),
            (
                b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
                43,
            ),
            (b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\nrest", 33),
            // Bare LFs, as lenient peers send them.
            (b"3\nabc\n0\n\n", 9),
            (b"0\r\n\r\n", 5),
            (b"A \r\n0123456789\r\n0\r\n\r\n", 21),
        ];
        for (data, end) in cases {
            for step in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    feed(Body::chunked(), data, step),
                    Ok((*end, true)),
                    "{} in steps of {step}",
                    String::from_utf8_lossy(data)
                );
            }
        }
    }

    #[test]
    fn an_unfinished_chunked_body_takes_everything_and_waits() {
        for data in [&b"5\r\nhel"[..], b"5\r\nhello\r\n", b"0\r\nX: 1\r\n", b"ff"] {
            assert_eq!(feed(Body::chunked(), data, 1), Ok((data.len(), false)));
        }
    }

    #[test]
    fn broken_chunk_grammar_is_malformed() {
        for data in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\rX",
            b"1234567890abcdef0\r\n",
            b"5g\r\n",
        ] {
            assert_eq!(
                feed(Body::chunked(), data, 1),
                Err(Malformed),
                "{}",
                String::from_utf8_lossy(data)
            );
        }
        // The largest size that fits is still a size.
        assert_eq!(
            feed(Body::chunked(), b"fffffffffffffff\r\n", 1),
            Ok((17, false))
        );
    }

    #[test]
    fn lengths_take_exactly_their_bytes() {
        let mut b = Body::length(5);
        assert_eq!(b.advance(b"abc"), Ok(3));
        assert_eq!(b, Body::Length(2));
        assert_eq!(b.advance(b"deGET"), Ok(2));
        assert_eq!(b, Body::Done);
        assert_eq!(b.advance(b"more"), Ok(0));
        assert_eq!(Body::length(0), Body::Done);
        let mut b = Body::UntilClose;
        assert_eq!(b.advance(b"anything"), Ok(8));
    }

    #[test]
    fn header_values() {
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"18446744073709551615"), None);
        assert_eq!(
            content_length(b"1844674407370955161"),
            Some(1_844_674_407_370_955_161)
        );
        for bad in [&b""[..], b"-1", b"4 2", b"0x10", b"1,1", b"+5"] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
        assert!(has_token(b"keep-alive, Close", "close"));
        assert!(!has_token(b"closed", "close"));
        assert!(ends_chunked(b"gzip, Chunked "));
        assert!(!ends_chunked(b"chunked, gzip"));
        assert!(!ends_chunked(b""));
    }
}
