//! Deterministic tests of every detection rule and policy on mock virtqueues.
