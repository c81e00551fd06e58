//! libFuzzer entry for `ration_fuzz::core_apply` (see crates/ration-fuzz and fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ration_fuzz::core_apply(data));
