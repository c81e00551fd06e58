//! Ration's end-to-end tests, the ones that concern the repository as a whole rather
//! than one crate (each crate's own integration tests live in its `tests/`):
//!
//! - `deploy_manifests.rs`: every flag, `RATION_*` variable, config key and port
//!   that deploy/ uses is one `rationd` accepts;
//! - `layering.rs`: the crates depend on each other only as ARCHITECTURE.md draws
//!   it (`ration-store` knows no gRPC, `ration-client` no storage or consensus).
//!
//! This library is empty; it exists so the package has a target besides its tests.
