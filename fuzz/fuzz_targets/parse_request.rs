//! libFuzzer target: descriptor-chain and request parsing over mock guest
//! memory (the body and its properties: `pinblk_fuzz::parse_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pinblk_fuzz::parse_request(data);
});
