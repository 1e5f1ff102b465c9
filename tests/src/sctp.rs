//! Hand-crafted SCTP packets (RFC 9260) for raw-socket servers and probes, so SCTP
//! reachability can be tested without the kernel SCTP module.
//!
//! Only the handshake's first half is modelled: a probe sends INIT, a listening
//! server answers INIT-ACK whose State Cookie carries the server's `"<ns>/<pod>\n"`
//! text, and a server without a listener on the port answers ABORT (like the kernel).

/// IP protocol number of SCTP.
pub const IPPROTO_SCTP: i32 = 132;
/// Chunk types used here.
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}
static CRC32C: [u32; 256] = crc32c_table();

/// CRC32c (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Fill in the checksum of a complete SCTP packet (field stored little-endian, as Linux does).
pub fn set_checksum(pkt: &mut [u8]) {
    pkt[8..12].fill(0);
    let c = crc32c(pkt);
    pkt[8..12].copy_from_slice(&c.to_le_bytes());
}

/// True if the packet's checksum is correct.
pub fn checksum_ok(pkt: &[u8]) -> bool {
    if pkt.len() < 12 {
        return false;
    }
    let mut p = pkt.to_vec();
    let got = [p[8], p[9], p[10], p[11]];
    set_checksum(&mut p);
    got == [p[8], p[9], p[10], p[11]]
}

fn header(src: u16, dst: u16, vtag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

fn init_body(chunk: u8, tag: u32, params: &[u8]) -> Vec<u8> {
    let len = 20 + params.len();
    let mut c = vec![chunk, 0];
    c.extend_from_slice(&(len as u16).to_be_bytes());
    c.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    c.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    c.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    c.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    c.extend_from_slice(params);
    while c.len() % 4 != 0 {
        c.push(0);
    }
    c
}

/// An INIT from `src` to `dst` port with our initiate tag `tag`.
pub fn init(src: u16, dst: u16, tag: u32) -> Vec<u8> {
    let mut p = header(src, dst, 0);
    p.extend(init_body(CHUNK_INIT, tag, &[]));
    set_checksum(&mut p);
    p
}

/// An INIT-ACK answering an INIT (`peer_tag` = the INIT's initiate tag), carrying `cookie`.
pub fn init_ack(src: u16, dst: u16, peer_tag: u32, my_tag: u32, cookie: &[u8]) -> Vec<u8> {
    let mut param = vec![];
    param.extend_from_slice(&7u16.to_be_bytes()); // State Cookie
    param.extend_from_slice(&((4 + cookie.len()) as u16).to_be_bytes());
    param.extend_from_slice(cookie);
    let mut p = header(src, dst, peer_tag);
    p.extend(init_body(CHUNK_INIT_ACK, my_tag, &param));
    set_checksum(&mut p);
    p
}

/// An ABORT answering an out-of-the-blue INIT (vtag = the INIT's initiate tag, T bit clear).
pub fn abort(src: u16, dst: u16, peer_tag: u32) -> Vec<u8> {
    let mut p = header(src, dst, peer_tag);
    p.extend_from_slice(&[CHUNK_ABORT, 0, 0, 4]);
    set_checksum(&mut p);
    p
}

/// The interesting fields of a received SCTP packet (first chunk only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src_port: u16,
    pub dst_port: u16,
    pub vtag: u32,
    pub chunk: u8,
    /// Initiate tag of an INIT / INIT-ACK.
    pub init_tag: Option<u32>,
    /// State Cookie of an INIT-ACK.
    pub cookie: Option<Vec<u8>>,
    pub checksum_ok: bool,
}

/// Parse an SCTP packet (starting at the SCTP common header).
pub fn parse(p: &[u8]) -> Option<Packet> {
    if p.len() < 16 {
        return None;
    }
    let be16 = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    let be32 = |o: usize| u32::from_be_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    let chunk = p[12];
    let clen = (be16(14) as usize).min(p.len() - 12);
    let mut pkt = Packet {
        src_port: be16(0),
        dst_port: be16(2),
        vtag: be32(4),
        chunk,
        init_tag: None,
        cookie: None,
        checksum_ok: checksum_ok(p),
    };
    if (chunk == CHUNK_INIT || chunk == CHUNK_INIT_ACK) && clen >= 20 {
        pkt.init_tag = Some(be32(16));
        let mut o = 12 + 20;
        while o + 4 <= 12 + clen {
            let (t, l) = (be16(o), be16(o + 2) as usize);
            if l < 4 || o + l > p.len() {
                break;
            }
            if t == 7 {
                pkt.cookie = Some(p[o + 4..o + l].to_vec());
            }
            o += (l + 3) & !3;
        }
    }
    Some(pkt)
}

/// Strip the IPv4 header that AF_INET raw sockets deliver.
pub fn strip_ipv4(buf: &[u8]) -> Option<&[u8]> {
    let ihl = (*buf.first()? & 0x0f) as usize * 4;
    buf.get(ihl..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn roundtrip() {
        let i = init(40000, 9000, 0xdeadbeef);
        let p = parse(&i).unwrap();
        assert!(p.checksum_ok);
        assert_eq!(
            (p.src_port, p.dst_port, p.vtag, p.chunk, p.init_tag),
            (40000, 9000, 0, CHUNK_INIT, Some(0xdeadbeef))
        );
        let a = init_ack(9000, 40000, 0xdeadbeef, 7, b"default/b\n");
        let p = parse(&a).unwrap();
        assert!(p.checksum_ok);
        assert_eq!(p.vtag, 0xdeadbeef);
        assert_eq!(p.chunk, CHUNK_INIT_ACK);
        assert_eq!(p.cookie.as_deref(), Some(&b"default/b\n"[..]));
        let ab = parse(&abort(9000, 40000, 5)).unwrap();
        assert!(ab.checksum_ok);
        assert_eq!((ab.chunk, ab.vtag), (CHUNK_ABORT, 5));
        let mut bad = a.clone();
        bad[20] ^= 1;
        assert!(!parse(&bad).unwrap().checksum_ok);
    }
}
