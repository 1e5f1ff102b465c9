//! Per-identity proofs over a node channel (issue 10). For each local identity X, a node
//! sends X's SVID chain and a signature with X's key over keying material exported from
//! this very channel (RFC 8446 section 7.5; RFC 9261's exported authenticators are the
//! model). The context of the export is X's SPIFFE ID, so a signature proves one
//! identity on one channel: it cannot be replayed on another channel, by another node,
//! or for another identity. The receiver checks the chain with the X509-SVID rules
//! (`SvidVerifier`) and the signature with the leaf's key, and learns "the peer node holds
//! X's key until X's SVID expires".
//!
//! Messages are length-prefixed JSON frames (u32 big-endian length, at most
//! `MAX_FRAME` bytes) on the channel's TLS stream.
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use rustls::SignatureScheme;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::verifier::{SvidVerifier, Usage};
use super::{NodeChannel, PROOF_EXPORTER_LABEL};
use crate::svid::source::X509Svid;
use crate::svid::spiffe_id::SpiffeId;
use crate::svid::x509::{check_leaf, SvidError};

/// What is signed: this prefix, then the 32 exported bytes.
pub const PROOF_SIGNED_PREFIX: &[u8] = b"zt identity proof v1\0";
/// Largest frame accepted (a chain of a few certificates, hex-encoded).
pub const MAX_FRAME: usize = 64 * 1024;

/// Signature schemes a proof may use (those of the keys SPIRE and the builtin CA issue).
const SCHEMES: &[SignatureScheme] =
    &[SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ECDSA_NISTP384_SHA384, SignatureScheme::ED25519, SignatureScheme::RSA_PSS_SHA256];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// The sender holds the key of the SVID whose chain (leaf first, DER, hex) this is.
    Proof { chain: Vec<String>, scheme: u16, signature: String },
    /// The sender no longer runs this identity (its last pod left): forget its proof.
    Withdraw { spiffe_id: String },
    /// The sender's clock (unix milliseconds) when it sent this; `echo` answers a request
    /// with the requester's own reading, so that the requester can take the round trip out.
    /// `installs`: the sender sends and understands `Installed` (a session's first message
    /// says so; a peer without the field never gets `Installed`, which it could not read).
    Clock {
        unix_ms: i64,
        echo: Option<i64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        installs: bool,
    },
    /// The receiver of a proof of `spiffe_id` (SVID valid until `not_after_unix_s`) wrote
    /// it into its proofs map, for every identity number it knows that carries the ID:
    /// its datapath admits that identity from the sender's node now. Sent only to a peer
    /// whose `Clock` carried `installs`.
    Installed { spiffe_id: String, not_after_unix_s: i64 },
}

/// The `type` of every message this version knows; a frame of another type (a newer peer's)
/// is skipped, not taken as a broken channel.
pub const MESSAGE_TYPES: &[&str] = &["proof", "withdraw", "clock", "installed"];

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofError {
    /// The chain breaks an X509-SVID rule (expired, not yet valid, wrong trust domain...).
    Svid(SvidError),
    /// The signature does not verify with the leaf's key over this channel's material.
    BadSignature,
    Malformed(String),
}

impl std::fmt::Display for ProofError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProofError::Svid(e) => write!(f, "{e}"),
            ProofError::BadSignature => write!(f, "the proof's signature does not verify with its SVID's key over this channel"),
            ProofError::Malformed(m) => write!(f, "malformed proof: {m}"),
        }
    }
}

impl std::error::Error for ProofError {}

/// A checked proof: the peer node holds this identity's key until `not_after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedProof {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The bytes a proof of `id` on `ch` signs.
fn signed_bytes(ch: &NodeChannel, id: &SpiffeId) -> Result<Vec<u8>, rustls::Error> {
    let ekm = ch.export_keying_material(PROOF_EXPORTER_LABEL, Some(id.to_string().as_bytes()))?;
    let mut m = PROOF_SIGNED_PREFIX.to_vec();
    m.extend_from_slice(&ekm);
    Ok(m)
}

/// This node's proof of `svid`'s identity on `ch`.
pub fn make_proof(ch: &NodeChannel, svid: &X509Svid) -> anyhow::Result<Message> {
    let msg = signed_bytes(ch, svid.spiffe_id())?;
    let signer =
        svid.certified().key.choose_scheme(SCHEMES).ok_or_else(|| anyhow::anyhow!("the key of {} has no supported signature scheme", svid.spiffe_id()))?;
    let signature = signer.sign(&msg)?;
    Ok(Message::Proof { chain: svid.chain().iter().map(|c| hex(c.as_ref())).collect(), scheme: u16::from(signer.scheme()), signature: hex(&signature) })
}

/// Checks a peer's proof received on `ch`: the chain by every X509-SVID rule (time through
/// the verifier's clock), then the signature over this channel's material for the SVID's ID.
pub fn check_proof(ch: &NodeChannel, verifier: &SvidVerifier, chain: &[String], scheme: u16, signature: &str) -> Result<VerifiedProof, ProofError> {
    let ders: Vec<CertificateDer<'static>> =
        chain.iter().map(|h| unhex(h).map(CertificateDer::from)).collect::<Result<_, _>>().map_err(ProofError::Malformed)?;
    let (leaf, intermediates) = ders.split_first().ok_or(ProofError::Svid(SvidError::NoCertificate))?;
    let id = verifier.verify(leaf, intermediates, Usage::Client).map_err(ProofError::Svid)?;
    let facts = check_leaf(leaf).map_err(ProofError::Svid)?;
    let sig = unhex(signature).map_err(ProofError::Malformed)?;
    let msg = signed_bytes(ch, &id).map_err(|e| ProofError::Malformed(format!("keying material: {e}")))?;
    let scheme = SignatureScheme::from(scheme);
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let candidates = algs.mapping.iter().find(|(s, _)| *s == scheme).map(|(_, a)| *a).ok_or(ProofError::BadSignature)?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| ProofError::Malformed(format!("{e:?}")))?;
    if !candidates.iter().any(|alg| ee.verify_signature(*alg, &msg, &sig).is_ok()) {
        return Err(ProofError::BadSignature);
    }
    Ok(VerifiedProof { spiffe_id: id, not_before: facts.not_before, not_after: facts.not_after })
}

/// Writes one frame.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> std::io::Result<()> {
    let body = serde_json::to_vec(m)?;
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await
}

/// Reads one frame (None at a clean end of stream).
pub async fn recv<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Message>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {n} bytes (at most {MAX_FRAME})")));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The peer's clock offset from a `Clock` exchange: the peer read `peer_ms` between this
/// node's `sent_ms` and `received_ms`; positive = the peer is ahead.
pub fn clock_offset_ms(sent_ms: i64, peer_ms: i64, received_ms: i64) -> i64 {
    peer_ms - (sent_ms + received_ms) / 2
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || s.len() > 2 * MAX_FRAME {
        return Err("odd or oversized hex".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad hex at {i}"))).collect()
}

#[cfg(test)]
mod tests;
