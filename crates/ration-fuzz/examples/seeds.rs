//! Writes every target's seed inputs into `DIR/TARGET/`, one file each, named by
//! content: `cargo run -p ration-fuzz --example seeds -- fuzz/corpus`.
//! `scripts/fuzz.sh` runs it before fuzzing; rerunning adds nothing twice.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: seeds DIR");
        std::process::exit(2);
    };
    for (name, _) in ration_fuzz::TARGETS {
        let target_dir = dir.join(name);
        std::fs::create_dir_all(&target_dir)?;
        let seeds = ration_fuzz::seeds::seeds(name);
        for seed in &seeds {
            let path = ration_fuzz::driver::failure_path(name, seed);
            let file =
                path.file_name().map(|f| f.to_string_lossy().replace("ration-fuzz-", "seed-"));
            std::fs::write(target_dir.join(file.unwrap_or_default()), seed)?;
        }
        eprintln!("{name}: {} seeds in {}", seeds.len(), target_dir.display());
    }
    Ok(())
}
