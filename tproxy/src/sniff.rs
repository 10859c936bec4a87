//! Deciding what a connection speaks from the client's first bytes.
//!
//! Only a complete-looking HTTP/1.x request line or the HTTP/2 preface turn
//! a connection into HTTP: a line-based protocol whose commands happen to
//! look like `WORD arg` (Redis inline commands, SMTP from a client) must not
//! be answered with `400 Bad Request`. Everything else is relayed untouched.

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (the client sent the preface).
    Http2,
    /// Anything else: relayed byte for byte.
    Raw,
}

/// The HTTP/2 connection preface.
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest request line we wait for before deciding on the method alone.
pub(crate) const MAX_SNIFF: usize = 16 * 1024;

const KNOWN_METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
];

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the bytes seen so far; `None` when more bytes are needed.
pub(crate) fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    // Method token, then one space.
    let Some(sp) = buf.iter().position(|&b| !is_tchar(b)) else {
        return if buf.len() > 32 {
            Some(Protocol::Raw)
        } else {
            None
        };
    };
    if sp == 0 || sp > 32 || buf[sp] != b' ' {
        return Some(Protocol::Raw);
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            let line = &buf[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Some(Protocol::Http1)
            } else {
                Some(Protocol::Raw)
            }
        }
        None if buf.len() >= MAX_SNIFF => Some(decide(buf)),
        None => None,
    }
}

/// The decision when no more bytes are coming (timeout, EOF, full buffer):
/// a known method and a space is HTTP/1 still on its way.
pub(crate) fn decide(buf: &[u8]) -> Protocol {
    if let Some(p) = classify_complete(buf) {
        return p;
    }
    let known = KNOWN_METHODS
        .iter()
        .any(|m| buf.len() > m.len() && buf.starts_with(m) && buf[m.len()] == b' ');
    if known {
        Protocol::Http1
    } else {
        Protocol::Raw
    }
}

fn classify_complete(buf: &[u8]) -> Option<Protocol> {
    if buf.len() >= MAX_SNIFF {
        return None;
    }
    classify(buf)
}

/// Whether `peeked` (the server's first bytes) is the header of an HTTP/2
/// SETTINGS frame on stream 0 (a server's connection preface): `None`
/// while too few bytes have arrived to tell, or the connection closed.
pub(crate) fn h2_settings_header(peeked: &[u8]) -> Option<bool> {
    if peeked.is_empty() {
        return Some(false);
    }
    // Type SETTINGS (4), stream identifier 0, length a multiple of 6.
    let fits = peeked.get(3).is_none_or(|t| *t == 4) && peeked.iter().skip(5).all(|b| *b == 0);
    if !fits {
        return Some(false);
    }
    if peeked.len() < 9 {
        return None;
    }
    let len = u32::from_be_bytes([0, peeked[0], peeked[1], peeked[2]]);
    Some(len.is_multiple_of(6))
}

/// Whether `peeked` (the server's first bytes) may be the start of an
/// HTTP/1 response.
pub(crate) fn http_response_start(peeked: &[u8]) -> bool {
    const START: &[u8] = b"HTTP/1.";
    let n = peeked.len().min(START.len());
    n > 0 && peeked[..n] == START[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h2_server_preface_is_told_from_a_banner() {
        // An empty SETTINGS frame, and one with two settings.
        assert_eq!(h2_settings_header(&[0, 0, 0, 4, 0, 0, 0, 0, 0]), Some(true));
        assert_eq!(
            h2_settings_header(&[0, 0, 12, 4, 0, 0, 0, 0, 0]),
            Some(true)
        );
        assert_eq!(h2_settings_header(&[0, 0, 12]), None);
        assert_eq!(h2_settings_header(b"220 smtp.example ESMTP"), Some(false));
        assert_eq!(h2_settings_header(b"SSH-2.0-OpenSSH_9.6"), Some(false));
        assert_eq!(
            h2_settings_header(&[0, 0, 7, 4, 0, 0, 0, 0, 0]),
            Some(false)
        );
        assert_eq!(
            h2_settings_header(&[0, 0, 6, 4, 0, 0, 0, 0, 1]),
            Some(false)
        );
        assert_eq!(h2_settings_header(&[]), Some(false));
    }

    #[test]
    fn an_early_http_answer_is_told_from_a_banner() {
        assert!(http_response_start(b"HTTP/1.1 503 Service Unavailable"));
        assert!(http_response_start(b"HTTP/1.0 "));
        assert!(http_response_start(b"HTT"));
        assert!(!http_response_start(b"220 smtp.example ESMTP"));
        assert!(!http_response_start(b"HTTP/2"));
        assert!(!http_response_start(b""));
    }

    #[test]
    fn request_lines_preface_and_others() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"PROPFIND /a HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET /index"), None);
        assert_eq!(classify(b"GET"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Some(Protocol::Raw)
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Protocol::Raw)
        );
        assert_eq!(classify(b"SET key value\r\n"), Some(Protocol::Raw));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Raw));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Raw));
        assert_eq!(classify(b"\x00\x01"), Some(Protocol::Raw));
        assert_eq!(decide(b"GET /slow"), Protocol::Http1);
        assert_eq!(decide(b"SET a b"), Protocol::Raw);
        assert_eq!(decide(b"PRI * HT"), Protocol::Raw);
        let long = [b"GET /".as_slice(), &[b'a'; MAX_SNIFF]].concat();
        assert_eq!(classify(&long), Some(Protocol::Http1));
    }
}
