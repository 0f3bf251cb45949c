//! The router's JSON request bodies (register, login, send).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cim_router::api::parse_all_bodies(data);
});
