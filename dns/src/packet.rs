//! UDP queries as NFQUEUE hands them over (whole IPv4 or IPv6 packets) and
//! the packets that answer them. Only the IP and UDP headers are read and
//! written here; the DNS message inside is hickory's business. It must not
//! touch anything but IPv4/IPv6 + UDP: fragments, other protocols and
//! truncated packets are `None`, and the caller lets them pass.

use std::net::IpAddr;

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
const PROTO_UDP: u8 = 17;
/// TTL or hop limit of the answers (Linux's default).
const REPLY_TTL: u8 = 64;
/// IPv6 extension headers that a UDP query may carry before its UDP header
/// and that the answer can skip: hop-by-hop, routing, destination options.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_DEST_OPTS: u8 = 60;
const EXT_AUTH: u8 = 51;
/// Most IPv6 extension headers walked before giving up.
const MAX_EXT_HEADERS: usize = 8;

/// The addresses, ports and UDP payload of a UDP packet.
struct Udp<'a> {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads an IPv4 or IPv6 packet holding one whole UDP datagram.
fn parse(packet: &[u8]) -> Option<Udp<'_>> {
    let first = *packet.first()?;
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            let total = usize::from(be16(packet, 2)?);
            if ihl < IPV4_HEADER || total < ihl || total > packet.len() {
                return None;
            }
            let frag = be16(packet, 6)?;
            // More fragments, or a fragment offset: not a whole datagram.
            if frag & 0x3fff != 0 || packet[9] != PROTO_UDP {
                return None;
            }
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            (src.into(), dst.into(), &packet[ihl..total])
        }
        6 => {
            if packet.len() < IPV6_HEADER {
                return None;
            }
            // 0 is a jumbogram's: not a DNS query.
            let payload_len = usize::from(be16(packet, 4)?);
            let end = IPV6_HEADER + payload_len;
            if payload_len == 0 || end > packet.len() {
                return None;
            }
            let mut next = packet[6];
            let mut at = IPV6_HEADER;
            let mut walked = 0;
            while next != PROTO_UDP {
                walked += 1;
                if walked > MAX_EXT_HEADERS || at + 2 > end {
                    return None;
                }
                let len = match next {
                    EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                        (usize::from(packet[at + 1]) + 1) * 8
                    }
                    EXT_AUTH => (usize::from(packet[at + 1]) + 2) * 4,
                    // Fragment headers, ESP, no next header, other protocols.
                    _ => return None,
                };
                next = packet[at];
                at += len;
            }
            if at > end {
                return None;
            }
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            (src.into(), dst.into(), &packet[at..end])
        }
        _ => return None,
    };
    let udp_len = usize::from(be16(l4, 4)?);
    if udp_len < UDP_HEADER || udp_len > l4.len() {
        return None;
    }
    Some(Udp {
        src,
        dst,
        sport: be16(l4, 0)?,
        dport: be16(l4, 2)?,
        payload: &l4[UDP_HEADER..udp_len],
    })
}

/// The UDP payload of a whole IPv4/IPv6 packet (None if not UDP, a
/// fragment, or truncated).
pub fn udp_payload(packet: &[u8]) -> Option<&[u8]> {
    parse(packet).map(|u| u.payload)
}

/// The IPv4 or IPv6 + UDP packet that answers `query_packet` (a whole IP
/// packet holding a UDP DNS query, as NFQUEUE hands it over: IPv4 with
/// options, IPv6 possibly with extension headers) with `dns` as payload:
/// source and destination addresses and ports swapped, TTL/hop limit 64,
/// IPv4 DF set, a fresh IPv4 id, correct IPv4 header checksum and UDP
/// checksum (mandatory on IPv6). `None` when the packet is not IPv4/IPv6 +
/// UDP or is a fragment.
pub fn udp_reply(query_packet: &[u8], dns: &[u8]) -> Option<Vec<u8>> {
    let q = parse(query_packet)?;
    let udp_len = u16::try_from(UDP_HEADER + dns.len()).ok()?;
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&q.dport.to_be_bytes());
    udp.extend_from_slice(&q.sport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(dns);
    // The answer goes from the query's destination to its source.
    let (from, to) = (q.dst, q.src);
    let mut out = match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let total = u16::try_from(IPV4_HEADER + udp.len()).ok()?;
            let mut h = Vec::with_capacity(usize::from(total));
            h.extend_from_slice(&[0x45, 0]);
            h.extend_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&rand::random::<u16>().to_be_bytes());
            // Flags: don't fragment; offset 0.
            h.extend_from_slice(&[0x40, 0x00, REPLY_TTL, PROTO_UDP, 0, 0]);
            h.extend_from_slice(&from.octets());
            h.extend_from_slice(&to.octets());
            let sum = !fold(sum16(&h, 0));
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&from.octets());
            pseudo.extend_from_slice(&to.octets());
            pseudo.extend_from_slice(&[0, PROTO_UDP]);
            pseudo.extend_from_slice(&udp_len.to_be_bytes());
            set_udp_checksum(&mut udp, &pseudo);
            h
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let mut h = Vec::with_capacity(IPV6_HEADER + udp.len());
            h.extend_from_slice(&[0x60, 0, 0, 0]);
            h.extend_from_slice(&udp_len.to_be_bytes());
            h.extend_from_slice(&[PROTO_UDP, REPLY_TTL]);
            h.extend_from_slice(&from.octets());
            h.extend_from_slice(&to.octets());
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&from.octets());
            pseudo.extend_from_slice(&to.octets());
            pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
            set_udp_checksum(&mut udp, &pseudo);
            h
        }
        _ => return None,
    };
    out.extend_from_slice(&udp);
    Some(out)
}

/// Fills in the UDP checksum over the pseudo-header and the datagram. A
/// computed 0 is sent as 0xffff (0 means "no checksum", RFC 768).
fn set_udp_checksum(udp: &mut [u8], pseudo: &[u8]) {
    let sum = !fold(sum16(udp, sum16(pseudo, 0)));
    let sum = if sum == 0 { 0xffff } else { sum };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
}

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with 0)
/// to `acc`, without folding.
fn sum16(data: &[u8], acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut acc = acc;
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a one's-complement sum into 16 bits.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}
