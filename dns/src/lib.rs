//! netfault-dns: what the `dns-*` faults do to a pod's DNS queries.
//!
//! This crate owns the decision and the answers, for both datapaths: the
//! agent's NFQUEUE engine hands it UDP queries (whole IP packets), the
//! transparent proxy hands it the messages of DNS-over-TCP connections.
//! - [`Query::parse`] reads a query once, with hickory-proto;
//! - [`decide`] runs the sandbox's DNS actions over it, in order, and says
//!   what happens: pass it on (maybe late), drop it, or answer it;
//! - the answers are built with hickory-proto's `Message` (never by hand);
//! - [`udp_payload`] and [`udp_reply`] take a queued UDP query packet apart
//!   and build the IP + UDP packet that answers it.
//!
//! It must not do I/O, keep state between queries, or count anything
//! itself: the callers own sockets, queues, timers and counters (they learn
//! what to count through [`decide`]'s events and [`NotHandled`]).
//!
//! Behaviour worth knowing:
//! - Every forged answer copies the query's id, opcode, RD and CD bits and
//!   its question (the name exactly as asked, case included), with QR and RA
//!   set and AA clear. EDNS0 is answered with EDNS0 (RFC 6891): the query's
//!   UDP payload size capped to 1232, version 0, the DO bit copied.
//! - Over UDP an answer larger than the client takes (512 bytes without
//!   EDNS, else the size it advertised, at least 512) goes out with TC set
//!   and no answer records, so the client retries over TCP.
//! - `dns-truncate` acts on UDP only: over TCP it neither matches nor acts.

mod answer;
mod decide;
mod packet;
mod query;

pub use netfault_api::action::{DnsAction, DnsFault, Rcode};

pub use decide::decide;
pub use packet::{udp_payload, udp_reply};
pub use query::Query;

/// The transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Why a payload is left alone (the caller passes it through untouched).
#[derive(Debug, thiserror::Error)]
pub enum NotHandled {
    /// Not a parseable DNS message (the caller counts these).
    #[error("malformed DNS message: {0}")]
    Malformed(String),
    /// A well-formed message that is not a standard query with exactly one
    /// question (a response, a NOTIFY/UPDATE, qdcount != 1).
    #[error("not a standard query")]
    NotAQuery,
}

/// What happens to a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the query unchanged.
    Pass,
    /// No answer at all.
    Drop,
    /// Answer the client with this DNS message (wire bytes, without the TCP
    /// length prefix).
    Answer(Vec<u8>),
}

/// [`decide`]'s answer: after `delay`, do `outcome`.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub delay: std::time::Duration,
    pub outcome: Outcome,
}

/// What [`decide`] reports for one action, for the caller's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The action's selector picked the query.
    Matched,
    /// The action acted on it (after its `percent` draw).
    Affected,
}

#[cfg(test)]
mod tests;
