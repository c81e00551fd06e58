//! Compiles proto/ with the vendored protoc: nothing to install by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs the protoc named by PROTOC.
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Read at run time, not baked in with env!: a build script compiled for one
    // checkout (a git worktree sharing the target directory) must not read another's.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [root.join("ration/v1/ledger.proto"), root.join("ration/v1/cluster.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ration_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
