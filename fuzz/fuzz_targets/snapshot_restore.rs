//! libFuzzer entry for `ration_fuzz::snapshot_restore` (see crates/ration-fuzz and fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ration_fuzz::snapshot_restore(data));
