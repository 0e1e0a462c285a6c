//! Device-agnostic page cache policy.
