//! Any header against any body: verification answers, never panics, and never accepts a
//! signature that is not the body's.
use understudy_adapters::github::webhook::{sign, verify_signature};

/// One input.
pub fn run(data: &[u8]) {
    let split = data.first().map_or(0, |&n| n as usize).min(data.len());
    let (header, body) = data.split_at(split);
    let header = String::from_utf8_lossy(header);
    let secret = b"fuzz-secret";
    if verify_signature(secret, body, Some(&header)).is_ok() {
        assert_eq!(header, sign(secret, body), "accepted a signature that is not the body's");
    }
    assert!(verify_signature(secret, body, Some(&sign(secret, body))).is_ok());
}
