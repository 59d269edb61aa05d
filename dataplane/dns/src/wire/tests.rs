use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery};
use hickory_proto::rr::{Name, RecordType};

use super::*;

fn query_bytes(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

#[test]
fn parses_a_query_and_lower_cases_the_name() {
    let bytes = query_bytes(
        "Hello.Default.SVC.cluster.local.",
        RecordType::A,
        Some(4096),
    );
    let q = parse_query(&bytes).unwrap();
    assert_eq!(q.id, 0x1234);
    assert_eq!(q.qtype, TYPE_A);
    assert_eq!(
        q.name(),
        &name_to_wire("hello.default.svc.cluster.local").unwrap()[..]
    );
    assert_eq!(q.label_count(), 5);
    assert_eq!(q.label(1), b"default");
    assert_eq!(
        q.zone_start(&name_to_wire("cluster.local").unwrap()),
        Some(3)
    );
    assert_eq!(q.zone_start(&name_to_wire("local").unwrap()), Some(4));
    assert_eq!(q.zone_start(&name_to_wire("example.com").unwrap()), None);
    // A suffix match must fall on a label boundary.
    assert_eq!(q.zone_start(&name_to_wire("r.local").unwrap()), None);
    assert_eq!(q.udp_limit(), EDNS_UDP_MAX as usize);
    assert!(q.recursion_desired());
}

#[test]
fn response_echoes_question_casing_and_sets_flags() {
    let bytes = query_bytes("Hello.cluster.local.", RecordType::A, None);
    let q = parse_query(&bytes).unwrap();
    let mut rr = vec![0xC0, 0x0C];
    rr.extend(crate::zone::rr_tail(TYPE_A, 5, &[10, 96, 0, 1]));
    let parts = AnswerParts {
        rcode: Rcode::NoError,
        answers: &rr,
        answer_count: 1,
        soa: None,
    };
    let mut out = Vec::new();
    write_answer(&bytes, &q, &parts, 512, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert!(m.metadata.authoritative && m.metadata.recursion_desired);
    assert_eq!(m.queries[0].name().to_ascii(), "Hello.cluster.local.");
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].ttl, 5);
    assert!(m.edns.is_none());
}

#[test]
fn oversized_answers_are_truncated_with_tc() {
    let bytes = query_bytes("big.cluster.local.", RecordType::A, None);
    let q = parse_query(&bytes).unwrap();
    let mut rrs = Vec::new();
    for i in 0..40u8 {
        rrs.extend([0xC0, 0x0C]);
        rrs.extend(crate::zone::rr_tail(TYPE_A, 5, &[10, 0, 0, i]));
    }
    let parts = AnswerParts {
        rcode: Rcode::NoError,
        answers: &rrs,
        answer_count: 40,
        soa: None,
    };
    let mut out = Vec::new();
    write_answer(&bytes, &q, &parts, 512, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    write_answer(&bytes, &q, &parts, 65535, &mut out);
    assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 40);
}

#[test]
fn garbage_and_responses_are_dropped() {
    assert_eq!(parse_query(&[]).err(), Some(Reject::Drop));
    assert_eq!(parse_query(&[1, 2, 3]).err(), Some(Reject::Drop));
    let mut resp = query_bytes("a.b.", RecordType::A, None);
    resp[2] |= 0x80;
    assert_eq!(parse_query(&resp).err(), Some(Reject::Drop));
}

#[test]
fn malformed_queries_get_formerr() {
    let good = query_bytes("a.example.", RecordType::A, None);
    // Truncated in the middle of the name.
    let r = parse_query(&good[..14]).err().unwrap();
    assert!(matches!(r, Reject::FormErr(_)));
    // Truncated type/class.
    assert!(matches!(
        parse_query(&good[..good.len() - 2]),
        Err(Reject::FormErr(_))
    ));
    // Two questions.
    let mut two = good.clone();
    two[5] = 2;
    assert!(matches!(parse_query(&two), Err(Reject::FormErr(_))));
    // A compression pointer that points at itself (a loop).
    let mut looped = good[..12].to_vec();
    looped.extend([0xC0, 0x0C, 0, 1, 0, 1]);
    assert!(matches!(parse_query(&looped), Err(Reject::FormErr(_))));
    // A label length of 64 (0x40: a reserved label type) and a name over 255 octets.
    let mut oversized = good[..12].to_vec();
    oversized.push(64);
    oversized.extend([b'a'; 64]);
    oversized.extend([0, 0, 1, 0, 1]);
    assert!(matches!(parse_query(&oversized), Err(Reject::FormErr(_))));
    let mut long = good[..12].to_vec();
    for _ in 0..5 {
        long.push(63);
        long.extend([b'a'; 63]);
    }
    long.extend([0, 0, 1, 0, 1]);
    assert!(matches!(parse_query(&long), Err(Reject::FormErr(_))));
    // An additional record that is not an OPT.
    let mut extra = good.clone();
    extra[11] = 1;
    extra.extend([0, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
    assert!(matches!(parse_query(&extra), Err(Reject::FormErr(_))));
}

#[test]
fn error_responses_keep_the_id_and_say_why() {
    let mut two = query_bytes("a.example.", RecordType::A, None);
    two[5] = 2;
    let mut out = Vec::new();
    let reject = parse_query(&two).err().unwrap();
    assert_eq!(error_response(&two, reject, &mut out), Some(Rcode::FormErr));
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::FormErr
    );

    let mut notify = query_bytes("a.example.", RecordType::SOA, None);
    notify[2] |= 4 << 3; // opcode NOTIFY
    let reject = parse_query(&notify).err().unwrap();
    assert_eq!(reject, Reject::NotImp);
    assert_eq!(
        error_response(&notify, reject, &mut out),
        Some(Rcode::NotImp)
    );
}

#[test]
fn edns_version_1_gets_badvers() {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(HQuery::query(
        Name::from_ascii("a.example.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let bytes = m.to_vec().unwrap();
    let reject = parse_query(&bytes).err().unwrap();
    assert_eq!(reject, Reject::BadVers);
    let mut out = Vec::new();
    assert_eq!(
        error_response(&bytes, reject, &mut out),
        Some(Rcode::BadVers)
    );
    let resp = Message::from_vec(&out).unwrap();
    // Extended rcode 16 (BADVERS; hickory names the shared code BADSIG).
    assert_eq!(u16::from(resp.metadata.response_code), 16);
}

#[test]
fn names_round_trip_and_are_validated() {
    let w = name_to_wire("Foo.Bar.").unwrap();
    assert_eq!(w, b"\x03foo\x03bar\x00");
    assert_eq!(wire_to_name(&w), "foo.bar.");
    assert_eq!(name_to_wire("").unwrap(), vec![0]);
    assert!(name_to_wire("a..b").is_err());
    assert!(name_to_wire(&"a".repeat(64)).is_err());
    assert!(name_to_wire(&vec!["a".repeat(63); 5].join(".")).is_err());
}
