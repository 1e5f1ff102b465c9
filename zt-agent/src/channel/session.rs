//! One node channel's proof session (issue 10): both ends run it. Each end proves every
//! local identity it holds an SVID for (when the session starts, i.e. when a peer appears,
//! and whenever its set changes: a pod started, an SVID was renewed, the last pod of an
//! identity left, which withdraws it), answers clock requests, and reports what the peer
//! proved, withdrew or failed to prove. A renewed SVID is proven again while the old
//! proof still holds (make-before-break: the receiver replaces the expiry).
//!
//! A clock request every `PING_INTERVAL` re-measures the offset; a peer silent for
//! `SILENCE_LIMIT` ends the session (so its proofs go after the grace).
//!
//! One task per channel: reads are cancel-safe (`read` into a buffer), so a change of the
//! local set can interrupt waiting for the peer without losing a partial frame.
use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::proofs::{check_proof, clock_offset_ms, make_proof, Message, ProofError, VerifiedProof, MAX_FRAME, MESSAGE_TYPES};
use super::verifier::SvidVerifier;
use super::NodeChannel;
use crate::svid::clock::Clock;
use crate::svid::source::X509Svid;
use crate::svid::spiffe_id::SpiffeId;

/// This node's identities and their current SVIDs.
pub type LocalSvids = BTreeMap<SpiffeId, Arc<X509Svid>>;

/// What a session learns about its peer.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    Proven(VerifiedProof),
    Withdrawn(String),
    Refused {
        reason: ProofError,
    },
    /// The peer's clock minus this node's, milliseconds.
    ClockOffsetMs(i64),
    /// The peer sends `Installed` (its first `Clock` said so). Only sessions run with
    /// `run_installs` report this and the two below.
    PeerInstalls,
    /// The peer wrote this node's proof of the ID into its proofs map.
    Installed {
        spiffe_id: String,
        not_after_unix_s: i64,
    },
    /// This session withdrew the ID from the peer (what the peer installed of it is gone).
    WithdrawSent(String),
}

/// What a session tells its peer it installed: (SPIFFE ID, SVID not-after, unix seconds).
pub type InstalledAck = (String, i64);

fn ms(clock: &dyn Clock) -> i64 {
    crate::svid::clock::unix_secs(clock.now()) * 1000 + (clock.now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_millis()).unwrap_or(0)) as i64
}

/// How often a session asks the peer's clock: the offset is measured again, and the peer's
/// answer shows it is still there.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// A peer heard from for this long is taken as gone (a node that vanished without closing
/// its connection: writes to it would succeed for many minutes).
pub const SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(35);

/// A session's ping interval and silence limit (tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub ping: std::time::Duration,
    pub silence: std::time::Duration,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness { ping: PING_INTERVAL, silence: SILENCE_LIMIT }
    }
}

/// What a session sent (metrics).
#[derive(Debug, Default)]
pub struct SentCounts {
    pub proofs: std::sync::atomic::AtomicU64,
    pub withdrawals: std::sync::atomic::AtomicU64,
}

/// Runs until the channel closes (Ok) or fails (Err). `events` gets what the peer proved.
/// Without `Installed`: the peer is not told it is understood, and nothing is acknowledged
/// (a peer of the version before `Installed`).
pub async fn run(
    ch: NodeChannel,
    verifier: SvidVerifier,
    clock: Arc<dyn Clock>,
    local: watch::Receiver<LocalSvids>,
    events: mpsc::Sender<SessionEvent>,
) -> anyhow::Result<()> {
    run_inner(ch, verifier, clock, local, events, &SentCounts::default(), Liveness::default(), None).await
}

/// `run`, counting what it sends in `counts`, announcing `Installed` in its first message,
/// sending `Installed` for each of `installs` (the caller wrote the peer's proof into its
/// map) when the peer announced it too, and reporting the peer's `Installed`
/// (`SessionEvent::Installed`) and this end's withdrawals (`WithdrawSent`).
#[allow(clippy::too_many_arguments)]
pub async fn run_installs(
    ch: NodeChannel,
    verifier: SvidVerifier,
    clock: Arc<dyn Clock>,
    local: watch::Receiver<LocalSvids>,
    events: mpsc::Sender<SessionEvent>,
    counts: &SentCounts,
    live: Liveness,
    installs: mpsc::UnboundedReceiver<InstalledAck>,
) -> anyhow::Result<()> {
    run_inner(ch, verifier, clock, local, events, counts, live, Some(installs)).await
}

#[allow(clippy::too_many_arguments)]
async fn run_inner(
    mut ch: NodeChannel,
    verifier: SvidVerifier,
    clock: Arc<dyn Clock>,
    mut local: watch::Receiver<LocalSvids>,
    events: mpsc::Sender<SessionEvent>,
    counts: &SentCounts,
    live: Liveness,
    mut installs: Option<mpsc::UnboundedReceiver<InstalledAck>>,
) -> anyhow::Result<()> {
    let acking = installs.is_some();
    // The peer announced `Installed` (its first Clock): only then is it sent.
    let mut peer_installs = false;
    let mut sent: LocalSvids = BTreeMap::new();
    let now = ms(clock.as_ref());
    write(&mut ch, &Message::Clock { unix_ms: now, echo: None, installs: acking }).await?;
    let current = local.borrow_and_update().clone();
    prove_changes(&mut ch, &mut sent, &current, counts, acking.then_some(&events)).await?;
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 16 * 1024];
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + live.ping, live.ping);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            n = ch.stream_mut().read(&mut tmp) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                heard = tokio::time::Instant::now();
                buf.extend_from_slice(&tmp[..n]);
                while let Some(m) = take_frame(&mut buf)? {
                    handle(&mut ch, &verifier, clock.as_ref(), &events, m, acking, &mut peer_installs, &sent).await?;
                }
            }
            Some((spiffe_id, not_after_unix_s)) = async { match installs.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                if peer_installs {
                    write(&mut ch, &Message::Installed { spiffe_id, not_after_unix_s }).await?;
                }
            }
            changed = local.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let current = local.borrow_and_update().clone();
                prove_changes(&mut ch, &mut sent, &current, counts, acking.then_some(&events)).await?;
            }
            _ = ping.tick() => {
                if heard.elapsed() > live.silence {
                    anyhow::bail!("nothing heard from the peer for {:?}", heard.elapsed());
                }
                write(&mut ch, &Message::Clock { unix_ms: ms(clock.as_ref()), echo: None, installs: acking }).await?;
            }
        }
    }
}

/// Proves what is new or renewed, withdraws what left (reported to `withdrawals` if given).
async fn prove_changes(
    ch: &mut NodeChannel,
    sent: &mut LocalSvids,
    current: &LocalSvids,
    counts: &SentCounts,
    withdrawals: Option<&mpsc::Sender<SessionEvent>>,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    for (id, svid) in current {
        if sent.get(id).is_some_and(|s| Arc::ptr_eq(s, svid) || s.not_after() == svid.not_after()) {
            continue;
        }
        let proof = make_proof(ch, svid)?;
        write(ch, &proof).await?;
        sent.insert(id.clone(), svid.clone());
        counts.proofs.fetch_add(1, Relaxed);
    }
    let gone: Vec<SpiffeId> = sent.keys().filter(|id| !current.contains_key(*id)).cloned().collect();
    for id in gone {
        write(ch, &Message::Withdraw { spiffe_id: id.to_string() }).await?;
        sent.remove(&id);
        counts.withdrawals.fetch_add(1, Relaxed);
        if let Some(tx) = withdrawals {
            tx.send(SessionEvent::WithdrawSent(id.to_string())).await.map_err(|_| anyhow::anyhow!("session events receiver closed"))?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    ch: &mut NodeChannel,
    verifier: &SvidVerifier,
    clock: &dyn Clock,
    events: &mpsc::Sender<SessionEvent>,
    m: Message,
    acking: bool,
    peer_installs: &mut bool,
    sent: &LocalSvids,
) -> anyhow::Result<()> {
    let ev = match m {
        Message::Proof { chain, scheme, signature } => match check_proof(ch, verifier, &chain, scheme, &signature) {
            Ok(p) => Some(SessionEvent::Proven(p)),
            Err(reason) => Some(SessionEvent::Refused { reason }),
        },
        Message::Withdraw { spiffe_id } => Some(SessionEvent::Withdrawn(spiffe_id)),
        Message::Clock { unix_ms, echo, installs } => {
            if installs && acking && !*peer_installs {
                *peer_installs = true;
                events.send(SessionEvent::PeerInstalls).await.map_err(|_| anyhow::anyhow!("session events receiver closed"))?;
            }
            match echo {
                None => {
                    write(ch, &Message::Clock { unix_ms: ms(clock), echo: Some(unix_ms), installs: acking }).await?;
                    None
                }
                Some(sent) => Some(SessionEvent::ClockOffsetMs(clock_offset_ms(sent, unix_ms, ms(clock)))),
            }
        }
        // Only a peer this end announced `installs` to sends it; one for an ID this end has
        // withdrawn since (it crossed the withdrawal) is stale.
        Message::Installed { spiffe_id, not_after_unix_s } => {
            let current = SpiffeId::parse(&spiffe_id).is_ok_and(|id| sent.contains_key(&id));
            (acking && current).then_some(SessionEvent::Installed { spiffe_id, not_after_unix_s })
        }
    };
    if let Some(ev) = ev {
        // The receiver went away: the session ends with it.
        events.send(ev).await.map_err(|_| anyhow::anyhow!("session events receiver closed"))?;
    }
    Ok(())
}

async fn write(ch: &mut NodeChannel, m: &Message) -> anyhow::Result<()> {
    let body = serde_json::to_vec(m)?;
    let s = ch.stream_mut();
    s.write_all(&(body.len() as u32).to_be_bytes()).await?;
    s.write_all(&body).await?;
    s.flush().await?;
    Ok(())
}

/// One complete frame off the front of `buf`, if there is one. A frame of a message type
/// this version does not know (a newer peer's) is skipped; a malformed one of a known
/// type ends the session.
fn take_frame(buf: &mut Vec<u8>) -> anyhow::Result<Option<Message>> {
    loop {
        if buf.len() < 4 {
            return Ok(None);
        }
        let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if n > MAX_FRAME {
            anyhow::bail!("frame of {n} bytes (at most {MAX_FRAME})");
        }
        if buf.len() < 4 + n {
            return Ok(None);
        }
        let m = match serde_json::from_slice::<Message>(&buf[4..4 + n]) {
            Ok(m) => Some(m),
            Err(e) => {
                let v: Option<serde_json::Value> = serde_json::from_slice(&buf[4..4 + n]).ok();
                match v.as_ref().and_then(|v| v.get("type")).and_then(|t| t.as_str()) {
                    Some(t) if !MESSAGE_TYPES.contains(&t) => {
                        log::debug!("node channels: skipping a message of unknown type {t:?}");
                        None
                    }
                    _ => anyhow::bail!("malformed message: {e}"),
                }
            }
        };
        buf.drain(..4 + n);
        if m.is_some() {
            return Ok(m);
        }
    }
}

#[cfg(test)]
mod tests;
