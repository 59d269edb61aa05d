//! The synchronous query path: parse, look up the snapshot, write the answer, all into a
//! caller-owned buffer without locks or allocation. What it cannot answer on its own (names
//! outside the cluster zone, autopath candidates) comes back as [`Action::Forward`] for the
//! asynchronous path in `server`.

use std::net::IpAddr;

use crate::metrics::Metrics;
use crate::wire::{
    self, AnswerParts, CLASS_ANY, CLASS_IN, Query, Rcode, TYPE_ANY, TYPE_SOA, error_response,
    parse_query, write_answer, write_empty,
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
                return self.answer_entry(msg, q, entry, Some(apex), client.is_some(), limit, out);
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
            return self.answer_entry(msg, q, entry, None, false, limit, out);
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
        write_answer(msg, q, &parts, limit, out);
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
