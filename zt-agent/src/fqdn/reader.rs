//! Reads captured DNS answers (`ZT_DNS_EVENTS`) and records their names in the cache.
//! Each `DnsEvent` carries the first `copy_len` (≤ 1024) bytes of the message: a cut copy
//! still yields the question and every answer record that decodes whole.
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Header, Message, Query};
use hickory_proto::rr::{RData, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::unix::AsyncFd;
use zt_common::*;

use super::cache::{FqdnCache, Observation};
use crate::metrics::Shared;

/// The parts of an answer the cache keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Lowercased, without the trailing dot.
    pub qname: String,
    pub qtype: u16,
    pub rcode: u16,
    /// A/AAAA records of the answer section in order, with TTLs.
    pub ips: Vec<(IpAddr, u32)>,
    pub cnames: Vec<String>,
    /// Every answer record decoded (false: cut or malformed after some records).
    pub complete: bool,
}

fn norm(name: &hickory_proto::rr::Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// Decode as much of a (possibly cut) DNS message as is whole. None without a question.
pub fn parse_message(data: &[u8]) -> Option<Parsed> {
    if let Ok(m) = Message::from_vec(data) {
        let q = m.queries.first()?;
        let mut p = Parsed {
            qname: norm(q.name()),
            qtype: u16::from(q.query_type()),
            rcode: u16::from(m.metadata.response_code),
            complete: true,
            ..Default::default()
        };
        for r in &m.answers {
            add_record(&mut p, r);
        }
        return Some(p);
    }
    // Cut or partly malformed: header, question, then answers one by one.
    let mut d = BinDecoder::new(data);
    let h = Header::read(&mut d).ok()?;
    let q = Query::read(&mut d).ok()?;
    let mut p = Parsed {
        qname: norm(q.name()),
        qtype: u16::from(q.query_type()),
        rcode: u16::from(h.metadata.response_code),
        ..Default::default()
    };
    for _ in 1..h.counts.queries {
        if Query::read(&mut d).is_err() {
            return Some(p);
        }
    }
    for _ in 0..h.counts.answers {
        match Record::read(&mut d) {
            Ok(r) => add_record(&mut p, &r),
            Err(_) => return Some(p),
        }
    }
    p.complete = true;
    Some(p)
}

fn add_record(p: &mut Parsed, r: &Record) {
    match &r.data {
        RData::A(a) => p.ips.push((IpAddr::V4(a.0), r.ttl)),
        RData::AAAA(a) => p.ips.push((IpAddr::V6(a.0), r.ttl)),
        RData::CNAME(c) => p.cnames.push(norm(&c.0)),
        _ => {}
    }
}

/// What one event adds to the cache (None: nothing readable).
pub fn observe(ev: &DnsEvent, now_unix_s: u64) -> Option<Observation> {
    let n = (ev.copy_len as usize).min(DNS_EVENT_DATA);
    let p = parse_message(&ev.data[..n])?;
    let learned = ev.ips_learned > 0 && ev.slots != 0;
    // The kernel learns the first FQDN_MAX_IPS_PER_ANSWER addresses, in answer order.
    let mut ips = p.ips;
    if learned {
        ips.truncate(ev.ips_learned as usize);
    }
    Some(Observation {
        local_id: ev.local_id,
        name: p.qname,
        ips,
        cnames: p.cnames,
        outcome: DnsStat::from_u8(ev.outcome).map(|s| s.name()).unwrap_or("unknown").to_string(),
        learned,
        now_unix_s,
    })
}

/// The reader task: runs until the ring fails.
pub async fn run(ring: aya::maps::RingBuf<aya::maps::MapData>, cache: Arc<Mutex<FqdnCache>>, metrics: Shared) {
    #[allow(deprecated)]
    let mut fd = match AsyncFd::new(ring) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("dns events ring: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                log::error!("dns events ring: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        let (mut read, mut bad) = (0u64, 0u64);
        let mut obs = vec![];
        while let Some(item) = ring.next() {
            read += 1;
            if item.len() < std::mem::size_of::<DnsEvent>() {
                bad += 1;
                continue;
            }
            // SAFETY: the item holds a whole DnsEvent (checked above), copied unaligned.
            let ev: DnsEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DnsEvent) };
            match observe(&ev, super::unix_now()) {
                Some(o) => obs.push(o),
                None => bad += 1,
            }
        }
        guard.clear_ready();
        let names = {
            let mut c = cache.lock().unwrap();
            for o in obs {
                log::debug!("dns: identity {} {} -> {:?} ({})", o.local_id, o.name, o.ips, o.outcome);
                c.record(o);
            }
            c.len()
        };
        let mut m = metrics.lock().unwrap();
        m.fqdn_events_read += read;
        m.fqdn_events_undecodable += bad;
        m.fqdn_cache_names = names;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::{rdata, Name, RecordType};

    fn answer(n: usize) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NoError;
        let name = Name::from_ascii("API.Example.com.").unwrap();
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(name.clone(), 30, RData::CNAME(rdata::CNAME(Name::from_ascii("edge.example.net.").unwrap()))));
        for i in 0..n {
            m.add_answer(Record::from_rdata(name.clone(), 30, RData::A(rdata::A([10, 0, (i / 250) as u8, (i % 250) as u8].into()))));
        }
        m.to_vec().unwrap()
    }

    fn event(msg: &[u8], ips_learned: u16) -> DnsEvent {
        let mut ev = DnsEvent { local_id: 300, slots: 1, ips_learned, outcome: DnsStat::Learned as u8, proto: 17, ..Default::default() };
        let n = msg.len().min(DNS_EVENT_DATA);
        ev.data[..n].copy_from_slice(&msg[..n]);
        ev.msg_len = msg.len() as u16;
        ev.copy_len = n as u16;
        ev
    }

    #[test]
    fn whole_answer() {
        let p = parse_message(&answer(3)).unwrap();
        assert_eq!(p.qname, "api.example.com");
        assert_eq!(p.qtype, 1);
        assert_eq!(p.cnames, ["edge.example.net"]);
        assert_eq!(p.ips.len(), 3);
        assert!(p.complete);
    }

    #[test]
    fn cut_copy_keeps_the_records_that_decode() {
        let msg = answer(100); // far over 1024 bytes
        assert!(msg.len() > DNS_EVENT_DATA);
        let o = observe(&event(&msg, 32), 5).unwrap();
        assert_eq!(o.name, "api.example.com");
        // The copy holds some whole records; the kernel learned 32 of them.
        assert!(!o.ips.is_empty() && o.ips.len() <= 32, "{}", o.ips.len());
        assert_eq!(o.ips[0].0, "10.0.0.0".parse::<IpAddr>().unwrap());
        assert!(o.learned);
        assert_eq!(o.outcome, "learned");
    }

    #[test]
    fn garbage_yields_nothing() {
        assert!(parse_message(&[0xff; 11]).is_none());
        assert!(parse_message(&[0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 0xc0, 0x0c]).is_none(), "a pointer loop in the question");
        let o = observe(&event(&answer(1), 0), 5).unwrap();
        assert!(!o.learned, "nothing learned: the names are for visibility only");
    }
}
