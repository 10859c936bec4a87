//! The answers the faults forge, built with hickory-proto's `Message`:
//! an error rcode, spoofed addresses, or an empty truncated answer. It must
//! not decide which answer a query gets (that is `decide`'s).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record};
use rand::Rng;

use crate::{Query, Transport};

/// The largest UDP payload our answers advertise (the DNS flag day 2020
/// value, which avoids IP fragmentation on common paths).
const EDNS_PAYLOAD_CAP: u16 = 1232;
/// What a client without EDNS takes over UDP (RFC 1035 §4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;

const QTYPE_A: u16 = 1;
const QTYPE_AAAA: u16 = 28;

/// How the answer to a query looks.
pub(crate) enum Body<'a> {
    /// This rcode, no records.
    Error(u8),
    /// NOERROR with these addresses, those of the query's family.
    Spoof { addresses: &'a [IpAddr], ttl: u32 },
    /// NOERROR with one random documentation address of the query's family.
    SpoofRandom { ttl: u32 },
    /// NOERROR, TC set, no records.
    Truncated,
}

/// The answer to `q`, as wire bytes; `None` only if hickory cannot encode
/// it (which a query it parsed does not cause).
pub(crate) fn build(
    q: &Query,
    body: &Body<'_>,
    transport: Transport,
    rng: &mut impl Rng,
) -> Option<Vec<u8>> {
    let mut m = skeleton(q);
    match body {
        Body::Error(rcode) => {
            m.set_response_code(ResponseCode::from_low(*rcode));
        }
        Body::Truncated => {
            m.set_truncated(true);
        }
        Body::Spoof { addresses, ttl } => {
            for ip in addresses.iter() {
                if let Some(rdata) = rdata_for(q.qtype(), *ip) {
                    m.add_answer(Record::from_rdata(q.question.name().clone(), *ttl, rdata));
                }
            }
        }
        Body::SpoofRandom { ttl } => {
            let ip = match q.qtype() {
                QTYPE_A => Some(IpAddr::V4(Ipv4Addr::new(
                    192,
                    0,
                    2,
                    rng.random_range(1..=254),
                ))),
                QTYPE_AAAA => {
                    let low: u128 = rng.random::<u128>() & ((1u128 << 96) - 1);
                    Some(IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | low)))
                }
                _ => None,
            };
            if let Some(rdata) = ip.and_then(|ip| rdata_for(q.qtype(), ip)) {
                m.add_answer(Record::from_rdata(q.question.name().clone(), *ttl, rdata));
            }
        }
    }
    let wire = m.to_vec().ok()?;
    if transport == Transport::Udp && wire.len() > udp_limit(q) {
        // Too big for the client's buffer: the empty answer with TC set
        // tells it to ask again over TCP (RFC 2181 §9).
        m.take_answers();
        m.set_truncated(true);
        return m.to_vec().ok();
    }
    Some(wire)
}

/// The header, question and EDNS every answer to `q` shares.
fn skeleton(q: &Query) -> Message {
    let mut m = Message::new();
    m.set_id(q.header.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.header.op_code())
        .set_recursion_desired(q.header.recursion_desired())
        // RFC 4035 §3.2.2: a server copies CD from query to response.
        .set_checking_disabled(q.header.checking_disabled())
        .set_recursion_available(true)
        .set_authoritative(false)
        .add_query(q.question.clone());
    if let Some(asked) = &q.edns {
        let mut edns = Edns::new();
        edns.set_version(0)
            .set_max_payload(asked.max_payload().min(EDNS_PAYLOAD_CAP))
            .set_dnssec_ok(asked.flags().dnssec_ok);
        m.set_edns(edns);
    }
    m
}

/// The largest UDP answer the client of `q` takes.
fn udp_limit(q: &Query) -> usize {
    match &q.edns {
        Some(e) => usize::from(e.max_payload()).max(CLASSIC_UDP_LIMIT),
        None => CLASSIC_UDP_LIMIT,
    }
}

/// The record data of `ip` for a query of `qtype`, if the family fits.
fn rdata_for(qtype: u16, ip: IpAddr) -> Option<RData> {
    match (qtype, ip) {
        (QTYPE_A, IpAddr::V4(v4)) => Some(RData::A(A(v4))),
        (QTYPE_AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(v6))),
        _ => None,
    }
}
