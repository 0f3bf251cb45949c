//! Session token verification (login on the control stream, bearer tokens on HTTP).
#![no_main]

use cim_core::token::TokenKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let key = TokenKey::new(b"fuzzing secret, not a real one");
        let _ = key.verify(token, 1_000, Some("server-1"));
    }
});
