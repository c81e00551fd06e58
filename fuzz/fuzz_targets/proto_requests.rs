//! libFuzzer entry for `ration_fuzz::proto_requests` (see crates/ration-fuzz and fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ration_fuzz::proto_requests(data));
