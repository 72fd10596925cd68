//! The settings of a running device that the control socket may change:
//! the policy and `--bounce`, `--on-mismatch`, and the read-delay fault
//! injection. Each is one atomic, read by the workers at every request
//! (relaxed loads, no lock on the data path); a change applies to the
//! requests admitted after it (a request keeps the decision it was admitted
//! with).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::integrity::OnMismatch;
use crate::pin::policy::{Policy, PolicyConfig};

/// Runtime-settable part of a device's settings (see the module docs).
#[derive(Debug)]
pub struct RuntimeSettings {
    policy: AtomicU8,
    bounce_always: AtomicBool,
    on_mismatch: AtomicU8,
    /// Injected READ delay, µs; 0 = no injection.
    read_delay_us: AtomicU64,
    /// `f64::to_bits` of the injection probability.
    read_delay_probability: AtomicU64,
}

fn policy_code(p: Policy) -> u8 {
    match p {
        Policy::Passthrough => 0,
        Policy::Bounce => 1,
        Policy::Stall => 2,
        Policy::Fail => 3,
    }
}

fn policy_of(code: u8) -> Policy {
    match code {
        0 => Policy::Passthrough,
        1 => Policy::Bounce,
        2 => Policy::Stall,
        _ => Policy::Fail,
    }
}

impl RuntimeSettings {
    /// The settings a device starts with.
    pub fn new(policy: &PolicyConfig, on_mismatch: OnMismatch) -> RuntimeSettings {
        let s = RuntimeSettings {
            policy: AtomicU8::new(policy_code(policy.policy)),
            bounce_always: AtomicBool::new(policy.bounce_always),
            on_mismatch: AtomicU8::new(0),
            read_delay_us: AtomicU64::new(0),
            read_delay_probability: AtomicU64::new(0),
        };
        s.set_on_mismatch(on_mismatch);
        s.set_read_delay(policy.read_delay, policy.read_delay_probability);
        s
    }

    /// `base` (the device's fixed settings: stall timeout, bounce pool)
    /// with the current policy, bounce mode and fault injection.
    pub fn policy(&self, base: &PolicyConfig) -> PolicyConfig {
        let us = self.read_delay_us.load(Ordering::Relaxed);
        PolicyConfig {
            policy: policy_of(self.policy.load(Ordering::Relaxed)),
            bounce_always: self.bounce_always.load(Ordering::Relaxed),
            read_delay: (us > 0).then(|| Duration::from_micros(us)),
            read_delay_probability: f64::from_bits(
                self.read_delay_probability.load(Ordering::Relaxed),
            ),
            ..base.clone()
        }
    }

    /// Sets the policy and, if given, whether every WRITE is bounced.
    pub fn set_policy(&self, policy: Policy, bounce_always: Option<bool>) {
        if let Some(b) = bounce_always {
            self.bounce_always.store(b, Ordering::Relaxed);
        }
        self.policy.store(policy_code(policy), Ordering::Relaxed);
    }

    /// The current `--on-mismatch`.
    pub fn on_mismatch(&self) -> OnMismatch {
        match self.on_mismatch.load(Ordering::Relaxed) {
            0 => OnMismatch::Report,
            _ => OnMismatch::Eio,
        }
    }

    /// Sets `--on-mismatch`.
    pub fn set_on_mismatch(&self, m: OnMismatch) {
        let code = match m {
            OnMismatch::Report => 0,
            OnMismatch::Eio => 1,
        };
        self.on_mismatch.store(code, Ordering::Relaxed);
    }

    /// Sets the injected READ delay (`None` or zero: off) and the
    /// probability (clamped to 0..=1) that a READ gets it.
    pub fn set_read_delay(&self, delay: Option<Duration>, probability: f64) {
        let p = if probability.is_nan() {
            0.0
        } else {
            probability.clamp(0.0, 1.0)
        };
        self.read_delay_probability
            .store(p.to_bits(), Ordering::Relaxed);
        let us = delay.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.read_delay_us.store(us, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_seen_by_the_next_snapshot_and_keep_the_fixed_settings() {
        let base = PolicyConfig {
            stall_timeout: Duration::from_millis(7),
            ..PolicyConfig::default()
        };
        let s = RuntimeSettings::new(&base, OnMismatch::Report);
        assert_eq!(s.policy(&base), base);
        s.set_policy(Policy::Passthrough, Some(true));
        let p = s.policy(&base);
        assert_eq!((p.policy, p.bounce_always), (Policy::Passthrough, true));
        assert_eq!(p.stall_timeout, Duration::from_millis(7));
        s.set_policy(Policy::Fail, None);
        assert_eq!(s.policy(&base).policy, Policy::Fail);
        assert!(s.policy(&base).bounce_always, "None keeps the bounce mode");
        s.set_on_mismatch(OnMismatch::Eio);
        assert_eq!(s.on_mismatch(), OnMismatch::Eio);
        s.set_read_delay(Some(Duration::from_millis(20)), 1.5);
        let p = s.policy(&base);
        assert_eq!(p.read_delay, Some(Duration::from_millis(20)));
        assert_eq!(p.read_delay_probability, 1.0);
        s.set_read_delay(None, 0.5);
        assert_eq!(s.policy(&base).read_delay, None);
    }
}
