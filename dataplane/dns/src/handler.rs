//! The synchronous query path: parse, look up the snapshot, write the answer, all into a
//! caller-owned buffer without locks or allocation. What it cannot answer on its own (names
//! outside the cluster zone, autopath candidates) comes back as [`Action::Forward`] for the
//! asynchronous path in `server`.

use std::net::IpAddr;

use crate::metrics::Metrics;
use crate::wire::{
    self, AnswerParts, CLASS_ANY, CLASS_IN, Query, Rcode, TYPE_A, TYPE_AAAA, TYPE_ANY, TYPE_SOA,
    TYPE_SRV, error_response, parse_query, write_answer, write_answer_with, write_empty,
};
use crate::zone::{Snapshot, ZoneReader, rr_tail};

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6_ARPA: &[u8] = b"\x03ip6\x04arpa\x00";

/// What to do with a message after the synchronous path.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// `out` holds the response.
    Reply(Rcode),
    /// Send nothing.
    Drop,
    /// Answer asynchronously (forwarding or autopath).
    Forward(Forward),
}

/// A query for the asynchronous path.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    pub qtype: u16,
    pub kind: ForwardKind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ForwardKind {
    /// A name outside the cluster zone: ask upstream.
    Upstream,
    /// Autopath: the name the client's search path was applied to (`google.com.` for
    /// `google.com.<ns>.svc.<zone>.` asked by a pod in `<ns>`).
    Autopath(String),
    /// An ExternalName Service: the CNAME is ours, its target is resolved and appended, as
    /// stub resolvers do not chase CNAMEs themselves.
    ChaseCname,
}

/// The cluster zone's query handler.
pub struct Handler {
    zone: ZoneReader,
    zone_wire: Box<[u8]>,
    /// The SOA after its owner name, for the authority section of negative answers.
    soa_tail: Box<[u8]>,
    autopath: bool,
}

/// The transport a query came in on, which bounds the response size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Handler {
    pub fn new(zone: ZoneReader, zone_wire: &[u8], soa_rdata: &[u8], ttl: u32) -> Handler {
        Handler {
            zone,
            zone_wire: zone_wire.into(),
            soa_tail: rr_tail(TYPE_SOA, ttl, soa_rdata).into(),
            autopath: true,
        }
    }

    /// Turn autopath (server-side search-path completion) on or off.
    pub fn set_autopath(&mut self, on: bool) {
        self.autopath = on;
    }

    pub fn zone_wire(&self) -> &[u8] {
        &self.zone_wire
    }

    pub fn snapshot(&self) -> arc_swap::Guard<std::sync::Arc<Snapshot>> {
        self.zone.load()
    }

    /// Handle one message from `client`, writing any response into `out` and counting it on
    /// metrics shard `shard`.
    pub fn handle(
        &self,
        msg: &[u8],
        client: IpAddr,
        transport: Transport,
        out: &mut Vec<u8>,
        metrics: &Metrics,
        shard: usize,
    ) -> Action {
        let q = match parse_query(msg) {
            Ok(q) => q,
            Err(reject) => {
                return match error_response(msg, reject, out) {
                    Some(rcode) => {
                        metrics.query(shard, 0, rcode);
                        Action::Reply(rcode)
                    }
                    None => {
                        metrics.dropped(shard);
                        Action::Drop
                    }
                };
            }
        };
        let action = self.answer(msg, &q, Some(client), transport, out);
        if let Action::Reply(rcode) = action {
            metrics.query(shard, q.qtype, rcode);
        }
        action
    }

    /// Answer `msg` from the cluster zone alone (no autopath, no forwarding) as if over TCP;
    /// false if the name is not the zone's to answer.
    pub fn answer_local(&self, msg: &[u8], out: &mut Vec<u8>) -> bool {
        match parse_query(msg) {
            Ok(q) => matches!(
                self.answer(msg, &q, None, Transport::Tcp, out),
                Action::Reply(_)
            ),
            Err(_) => false,
        }
    }

    /// `client` is `None` for internal lookups, which never take the autopath.
    fn answer(
        &self,
        msg: &[u8],
        q: &Query,
        client: Option<IpAddr>,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Action {
        if q.qclass != CLASS_IN && q.qclass != CLASS_ANY {
            write_empty(msg, q, Rcode::Refused, out);
            return Action::Reply(Rcode::Refused);
        }
        let limit = match transport {
            Transport::Udp => q.udp_limit(),
            Transport::Tcp => u16::MAX as usize,
        };
        let snap = self.zone.load();
        if let Some(apex) = q.zone_start(&self.zone_wire) {
            if let Some(entry) = snap.lookup(q.name()) {
                let chase = client.is_some();
                return self.answer_entry(msg, q, &snap, entry, Some(apex), chase, limit, out);
            }
            let autopath = client.and_then(|c| self.autopath_base(q, apex, &snap, c));
            if let Some(autopath) = autopath {
                return Action::Forward(Forward {
                    qtype: q.qtype,
                    kind: ForwardKind::Autopath(autopath),
                });
            }
            let parts = AnswerParts {
                rcode: Rcode::NxDomain,
                answers: &[],
                answer_count: 0,
                soa: Some((&self.soa_tail, apex)),
            };
            write_answer(msg, q, &parts, limit, out);
            return Action::Reply(Rcode::NxDomain);
        }
        // Reverse names of cluster addresses are ours; the rest of the reverse tree, like
        // every other name, belongs upstream.
        let reverse = q.name().ends_with(IN_ADDR_ARPA) || q.name().ends_with(IP6_ARPA);
        if reverse && let Some(entry) = snap.lookup(q.name()) {
            return self.answer_entry(msg, q, &snap, entry, None, false, limit, out);
        }
        Action::Forward(Forward {
            qtype: q.qtype,
            kind: ForwardKind::Upstream,
        })
    }

    /// `chase`: hand a CNAME-only answer to the asynchronous path to resolve its target.
    #[allow(clippy::too_many_arguments)]
    fn answer_entry(
        &self,
        msg: &[u8],
        q: &Query,
        snap: &Snapshot,
        entry: &crate::zone::Entry,
        apex: Option<usize>,
        chase: bool,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Action {
        let qtype = if q.qtype == TYPE_ANY {
            // RFC 8482: one RRset is a complete answer to ANY.
            entry.types().next().unwrap_or(TYPE_ANY)
        } else {
            q.qtype
        };
        let mut records = entry.records(qtype);
        if records.is_none() {
            records = entry.cname();
            if chase && records.is_some() {
                return Action::Forward(Forward {
                    qtype: q.qtype,
                    kind: ForwardKind::ChaseCname,
                });
            }
        }
        let parts = match records {
            Some((answers, answer_count)) => AnswerParts {
                rcode: Rcode::NoError,
                answers,
                answer_count,
                soa: None,
            },
            None => AnswerParts {
                rcode: Rcode::NoError,
                answers: &[],
                answer_count: 0,
                soa: apex.map(|a| (&*self.soa_tail, a)),
            },
        };
        if qtype == TYPE_SRV {
            write_answer_with(msg, q, &parts, limit, out, |out, limit| {
                srv_additional(snap, parts.answers, out, limit)
            });
        } else {
            write_answer(msg, q, &parts, limit, out);
        }
        Action::Reply(Rcode::NoError)
    }

    /// CoreDNS's autopath: a query for `<base>.<ns>.svc.<zone>` from a pod in `<ns>` is the
    /// first step of that pod's search path, so the server walks the rest of the path itself.
    fn autopath_base(
        &self,
        q: &Query,
        apex: usize,
        snap: &Snapshot,
        client: IpAddr,
    ) -> Option<String> {
        if !self.autopath || apex < 3 || q.label(apex - 1) != b"svc" {
            return None;
        }
        let ns = snap.pod_namespace(&client)?;
        if q.label(apex - 2) != ns.as_bytes() {
            return None;
        }
        let base_len = q.name().len() - q.suffix(apex - 2).len();
        let mut base = q.name()[..base_len].to_vec();
        base.push(0);
        Some(wire::wire_to_name(&base))
    }
}

/// The additional section of an SRV answer, as CoreDNS's kubernetes plugin writes it: the
/// A and AAAA records of each distinct target (a ClusterIP Service's name; a headless
/// Service's endpoint hostnames), so the client needs no second query. `answers` are the
/// SRV records just written at the end of `out`. A target's records go in whole or not at
/// all, up to `limit` bytes; returns how many were written.
fn srv_additional(snap: &Snapshot, answers: &[u8], out: &mut Vec<u8>, limit: usize) -> u16 {
    let start = out.len() - answers.len();
    let mut count = 0u16;
    for (at, rdata) in records(answers) {
        // SRV RDATA: priority, weight, port, then the target, uncompressed (RFC 2782).
        let Some(target) = rdata.get(6..) else {
            continue;
        };
        if records(&answers[..at]).any(|(_, r)| r.get(6..) == Some(target)) {
            continue;
        }
        let Some(entry) = snap.lookup(target) else {
            continue;
        };
        // The owner is a pointer to the target inside the SRV record when the offset fits
        // in a pointer's 14 bits (large TCP answers), else the name itself.
        let offset = start + at + 12 + 6;
        let owner_len = if offset <= 0x3FFF { 2 } else { target.len() };
        let sets = [TYPE_A, TYPE_AAAA].map(|t| entry.records(t));
        let size: usize = sets
            .iter()
            .flatten()
            .map(|(wire, n)| wire.len() - 2 * usize::from(*n) + owner_len * usize::from(*n))
            .sum();
        if out.len() + size > limit {
            break;
        }
        for (wire, _) in sets.into_iter().flatten() {
            for (rr_at, rr_data) in records(wire) {
                if offset <= 0x3FFF {
                    out.extend_from_slice(&(0xC000 | offset as u16).to_be_bytes());
                } else {
                    out.extend_from_slice(target);
                }
                out.extend_from_slice(&wire[rr_at + 2..rr_at + 12 + rr_data.len()]);
                count += 1;
            }
        }
    }
    count
}

/// The records of pre-encoded wire (each a 2-byte owner pointer, type, class, TTL, RDLENGTH,
/// RDATA): each record's offset and its RDATA.
fn records(wire: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_be_bytes([
            *wire.get(at + 10)?,
            *wire.get(at + 11)?,
        ]));
        let rdata = wire.get(at + 12..at + 12 + len)?;
        let this = at;
        at += 12 + len;
        Some((this, rdata))
    })
}
