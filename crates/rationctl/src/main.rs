//! `rationctl`: runs one command; on failure prints `error: ...` and exits 1 (2
//! for a command line clap refuses; `audit verify`: 3 for a prefix, 4 for a broken
//! file or chain).

#[tokio::main(flavor = "current_thread")]
async fn main() {
    use clap::Parser;
    let cli = match rationctl::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = rationctl::run_cli(cli, &mut out).await {
        drop(out);
        eprintln!("error: {e:#}");
        std::process::exit(rationctl::audit::exit_code(&e));
    }
}
