//! The wall clock behind every certificate decision, injectable so that tests (and the later
//! clock-skew diagnosis) can put a node ahead of or behind its issuer. Only `SystemClock` reads
//! `SystemTime::now()`; the logic takes a `&dyn Clock`.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    /// Wall-clock now (certificates carry wall-clock validity).
    fn now(&self) -> SystemTime;
}

/// The host's clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests, the SPIRE stand-in, skew injection).
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(now: SystemTime) -> ManualClock {
        ManualClock(Mutex::new(now))
    }

    /// A fixed, round starting point: tests read better with small offsets from it.
    pub fn at_unix(secs: u64) -> ManualClock {
        ManualClock::new(UNIX_EPOCH + Duration::from_secs(secs))
    }

    pub fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap() = t;
    }

    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }

    pub fn rewind(&self, d: Duration) {
        *self.0.lock().unwrap() -= d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// `t` as whole seconds since the Unix epoch (negative before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// A duration the way an operator reads it: `44m50s`, `2h0m5s`, `3d1h`, `750ms`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, _) => format!("{h}h{m}m{sec}s"),
        _ => format!("{days}d{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at_unix(1_000);
        assert_eq!(unix_secs(c.now()), 1_000);
        c.advance(Duration::from_secs(60));
        assert_eq!(unix_secs(c.now()), 1_060);
        c.rewind(Duration::from_secs(100));
        assert_eq!(unix_secs(c.now()), 960);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(44 * 60 + 50)), "44m50s");
        assert_eq!(human(Duration::from_secs(7205)), "2h0m5s");
        assert_eq!(human(Duration::from_secs(86400 + 3600)), "1d1h0m");
        assert_eq!(human(Duration::from_millis(750)), "750ms");
        assert_eq!(human(Duration::from_secs(9)), "9s");
    }
}
