//! The DNS wire format on the hot path: a strict, allocation-free parser for the one-question
//! queries stub resolvers send, and the writer that turns a query plus pre-encoded records
//! into a response. Everything unusual is rejected here with a reason, so the callers answer
//! FORMERR/NOTIMP or drop, and never have to trust a length from the network.

/// Largest response over UDP when the client sent no EDNS0 OPT record (RFC 1035).
pub const CLASSIC_UDP_MAX: usize = 512;
/// Largest UDP payload weir advertises and sends (the DNS Flag Day 2020 value, which avoids
/// IP fragmentation on ordinary paths).
pub const EDNS_UDP_MAX: u16 = 1232;
/// A DNS name is at most 255 octets on the wire (RFC 1035 §3.1).
pub const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_MX: u16 = 15;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

/// Response codes weir sends (RFC 1035 §4.1.1, RFC 6891 for BADVERS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
    /// Extended rcode 16 (RFC 6891): the upper bits travel in the OPT record.
    BadVers = 16,
}

/// Why a message was not accepted as a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Too short for a header, or a response: never answer (answering responses invites loops).
    #[error("not a DNS query")]
    Drop,
    /// A query we understand the header of but not the body: answer FORMERR.
    #[error("malformed query: {0}")]
    FormErr(&'static str),
    /// An opcode other than QUERY: answer NOTIMP.
    #[error("opcode not implemented")]
    NotImp,
    /// An EDNS version other than 0: answer BADVERS (RFC 6891 §6.1.3).
    #[error("unsupported EDNS version")]
    BadVers,
}

/// The EDNS0 part of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub payload: u16,
    pub dnssec_ok: bool,
}

/// A parsed one-question query. `name` is the lower-cased wire form of the question name,
/// which is the key of the zone index; the original casing stays in the query bytes and is
/// echoed back as-is (resolvers that randomise case, "0x20", check it).
pub struct Query {
    pub id: u16,
    /// The RD and CD bits of the query, to be copied into the response.
    flags: u16,
    name: [u8; MAX_NAME],
    name_len: usize,
    /// Offsets of each label's length byte within `name`.
    labels: [u8; 128],
    label_count: usize,
    pub qtype: u16,
    pub qclass: u16,
    /// End of the question section in the query bytes.
    question_end: usize,
    pub edns: Option<Edns>,
}

impl Query {
    /// The lower-cased wire name, including the terminating root label.
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    pub fn label_count(&self) -> usize {
        self.label_count
    }

    /// The suffix of the name that starts at label `i` (0 = the whole name).
    pub fn suffix(&self, i: usize) -> &[u8] {
        &self.name[self.labels[i] as usize..self.name_len]
    }

    /// Label `i` (without its length byte), lower-cased.
    pub fn label(&self, i: usize) -> &[u8] {
        let at = self.labels[i] as usize;
        &self.name[at + 1..self.labels[i + 1] as usize]
    }

    /// If the name lies within (or is) `zone` (wire form), the label index where `zone` starts.
    pub fn zone_start(&self, zone: &[u8]) -> Option<usize> {
        let zone_labels = label_count(zone);
        let i = self.label_count.checked_sub(zone_labels)?;
        (self.suffix(i) == zone).then_some(i)
    }

    /// Offset in the query (and response) at which the suffix starting at label `i` begins;
    /// used as a compression pointer target.
    fn suffix_offset(&self, i: usize) -> usize {
        12 + self.labels[i] as usize
    }

    /// The largest response this query's client accepts over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => (e.payload.min(EDNS_UDP_MAX) as usize).max(CLASSIC_UDP_MAX),
            None => CLASSIC_UDP_MAX,
        }
    }

    pub fn recursion_desired(&self) -> bool {
        self.flags & 0x0100 != 0
    }
}

fn label_count(wire: &[u8]) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < wire.len() && wire[i] != 0 {
        i += wire[i] as usize + 1;
        n += 1;
    }
    n
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parse a query. Strict by design: exactly one question, no answer or authority records, at
/// most one additional record which must be an OPT, and no compression pointers in the
/// question (nothing precedes it that a pointer could legitimately refer to, so pointer
/// loops cannot occur).
pub fn parse_query(msg: &[u8]) -> Result<Query, Reject> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return Err(Reject::Drop);
    }
    let opcode = (msg[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Err(Reject::NotImp);
    }
    let counts = [be16(msg, 4), be16(msg, 6), be16(msg, 8), be16(msg, 10)];
    let [Some(qd), Some(an), Some(ns), Some(ar)] = counts else {
        return Err(Reject::Drop);
    };
    if qd != 1 {
        return Err(Reject::FormErr("query must carry exactly one question"));
    }
    if an != 0 || ns != 0 {
        return Err(Reject::FormErr("query carries answer or authority records"));
    }
    if ar > 1 {
        return Err(Reject::FormErr(
            "query carries more than one additional record",
        ));
    }
    let mut q = Query {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        flags: u16::from_be_bytes([msg[2], msg[3]]) & 0x0110,
        name: [0; MAX_NAME],
        name_len: 0,
        labels: [0; 128],
        label_count: 0,
        qtype: 0,
        qclass: 0,
        question_end: 0,
        edns: None,
    };
    let mut at = 12;
    loop {
        let len = *msg
            .get(at)
            .ok_or(Reject::FormErr("question name is truncated"))? as usize;
        if len == 0 {
            break;
        }
        if len > MAX_LABEL {
            return Err(Reject::FormErr(
                "question name holds a compression pointer or an oversized label",
            ));
        }
        let label = msg
            .get(at + 1..at + 1 + len)
            .ok_or(Reject::FormErr("question name is truncated"))?;
        if q.name_len + 1 + len + 1 > MAX_NAME {
            return Err(Reject::FormErr("question name is longer than 255 octets"));
        }
        q.labels[q.label_count] = q.name_len as u8;
        q.label_count += 1;
        q.name[q.name_len] = len as u8;
        for (d, s) in q.name[q.name_len + 1..q.name_len + 1 + len]
            .iter_mut()
            .zip(label)
        {
            *d = s.to_ascii_lowercase();
        }
        q.name_len += 1 + len;
        at += 1 + len;
    }
    q.labels[q.label_count] = q.name_len as u8;
    q.name[q.name_len] = 0;
    q.name_len += 1;
    at += 1;
    let (Some(qtype), Some(qclass)) = (be16(msg, at), be16(msg, at + 2)) else {
        return Err(Reject::FormErr("question type or class is truncated"));
    };
    q.qtype = qtype;
    q.qclass = qclass;
    at += 4;
    q.question_end = at;
    if ar == 1 {
        // The OPT pseudo-record: root owner, type 41, class = payload size, TTL = extended
        // rcode, version and flags, then the options we skip over (bounds-checked).
        if msg.get(at) != Some(&0) || be16(msg, at + 1) != Some(TYPE_OPT) {
            return Err(Reject::FormErr("the additional record is not an EDNS0 OPT"));
        }
        let (Some(payload), Some(ttl_hi), Some(ttl_lo), Some(rdlen)) = (
            be16(msg, at + 3),
            be16(msg, at + 5),
            be16(msg, at + 7),
            be16(msg, at + 9),
        ) else {
            return Err(Reject::FormErr("OPT record is truncated"));
        };
        if msg.len() < at + 11 + rdlen as usize {
            return Err(Reject::FormErr("OPT record data is truncated"));
        }
        q.edns = Some(Edns {
            payload,
            dnssec_ok: ttl_lo & 0x8000 != 0,
        });
        if ttl_hi & 0xff != 0 {
            return Err(Reject::BadVers);
        }
    }
    Ok(q)
}

/// The header of a response to `query`: QR set, RD/CD copied, RA set (weir recurses by
/// forwarding), AA set when weir is the authority.
fn response_flags(query_flags: u16, authoritative: bool, rcode: Rcode) -> u16 {
    0x8080 | query_flags | if authoritative { 0x0400 } else { 0 } | (rcode as u16 & 0x0f)
}

fn opt_record(out: &mut Vec<u8>, ext_rcode: u8, dnssec_ok: bool) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&EDNS_UDP_MAX.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
}

/// A header-only error response (FORMERR, NOTIMP, BADVERS) to a message whose header was
/// readable. The question is not echoed: it may be the part that was malformed.
pub fn error_response(msg: &[u8], reject: Reject, out: &mut Vec<u8>) -> Option<Rcode> {
    let rcode = match reject {
        Reject::Drop => return None,
        Reject::FormErr(_) => Rcode::FormErr,
        Reject::NotImp => Rcode::NotImp,
        Reject::BadVers => Rcode::BadVers,
    };
    let badvers = rcode == Rcode::BadVers;
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    // Keep the opcode (RFC 1035: copied from the query) alongside RD.
    let flags = (flags & 0x7900) | 0x8080 | (rcode as u16 & 0x0f);
    out.clear();
    out.extend_from_slice(&msg[..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, u8::from(badvers)]);
    if badvers {
        opt_record(out, 1, false);
    }
    Some(rcode)
}

/// Which records go into an authoritative answer.
pub struct AnswerParts<'a> {
    pub rcode: Rcode,
    /// Pre-encoded answer records, each starting with a 2-byte owner-name placeholder that is
    /// a compression pointer to the question name (0xC00C), then type, class, TTL, RDATA.
    pub answers: &'a [u8],
    pub answer_count: u16,
    /// For negative answers: the SOA record's type..RDATA (owner written here as a pointer to
    /// the zone apex inside the question name).
    pub soa: Option<(&'a [u8], usize)>,
}

/// Write the response to `msg`/`query` into `out`. If it exceeds `limit`, the records are
/// left out and TC is set, so the client retries over TCP (RFC 7766).
pub fn write_answer(
    msg: &[u8],
    query: &Query,
    parts: &AnswerParts<'_>,
    limit: usize,
    out: &mut Vec<u8>,
) {
    write_answer_with(msg, query, parts, limit, out, |_, _| 0);
}

/// [`write_answer`], then `additional(out, limit)` appends records to the additional section
/// that must end by `limit` bytes and returns how many it wrote. Additional data is never
/// required (RFC 2181 §9): what does not fit is left out without setting TC, and nothing
/// is added to a truncated answer.
pub fn write_answer_with(
    msg: &[u8],
    query: &Query,
    parts: &AnswerParts<'_>,
    limit: usize,
    out: &mut Vec<u8>,
    additional: impl FnOnce(&mut Vec<u8>, usize) -> u16,
) {
    out.clear();
    out.extend_from_slice(&msg[..query.question_end]);
    let mut flags = response_flags(query.flags, true, parts.rcode);
    let soa_len = parts.soa.map_or(0, |(rr, _)| 2 + rr.len());
    let opt_len = if query.edns.is_some() { 11 } else { 0 };
    let fits = out.len() + parts.answers.len() + soa_len + opt_len <= limit;
    let (an, ns, ar) = if fits {
        out.extend_from_slice(parts.answers);
        if let Some((rr, apex_label)) = parts.soa {
            let ptr = 0xC000 | query.suffix_offset(apex_label) as u16;
            out.extend_from_slice(&ptr.to_be_bytes());
            out.extend_from_slice(rr);
        }
        let ar = additional(out, limit.saturating_sub(opt_len));
        (parts.answer_count, u16::from(parts.soa.is_some()), ar)
    } else {
        flags |= 0x0200;
        (0, 0, 0)
    };
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&an.to_be_bytes());
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    let ar = ar + u16::from(query.edns.is_some());
    out[10..12].copy_from_slice(&ar.to_be_bytes());
    if let Some(e) = query.edns {
        opt_record(out, 0, e.dnssec_ok);
    }
}

/// A header + question response with `rcode` and no records (REFUSED, SERVFAIL).
pub fn write_empty(msg: &[u8], query: &Query, rcode: Rcode, out: &mut Vec<u8>) {
    let parts = AnswerParts {
        rcode,
        answers: &[],
        answer_count: 0,
        soa: None,
    };
    write_answer(msg, query, &parts, usize::MAX, out);
    // Not authoritative: these are not answers from the zone.
    out[2] &= !0x04;
}

/// Wire form of a dotted name (`a.b.c` or `a.b.c.`), lower-cased and validated: labels of
/// 1..=63 octets, at most 255 octets in all.
pub fn name_to_wire(name: &str) -> Result<Vec<u8>, NameError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL {
                return Err(NameError(name.to_string()));
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    if out.len() > MAX_NAME {
        return Err(NameError(name.to_string()));
    }
    Ok(out)
}

/// Dotted form of a wire name (for logs and tests).
pub fn wire_to_name(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while let Some(&len) = wire.get(i) {
        if len == 0 {
            break;
        }
        let label = wire.get(i + 1..i + 1 + len as usize).unwrap_or_default();
        s.push_str(&String::from_utf8_lossy(label));
        s.push('.');
        i += 1 + len as usize;
    }
    if s.is_empty() { ".".into() } else { s }
}

/// A name that is not a valid DNS name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid DNS name (labels of 1-63 octets, 255 octets in all)")]
pub struct NameError(pub String);

#[cfg(test)]
mod tests;
