//! `rationd`: parse the configuration, set up logging, run the node until SIGTERM
//! or ctrl-c.

/// mimalloc: glibc malloc was a fifth of a node's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use ration_server::config::Args;

fn main() -> anyhow::Result<()> {
    let config = Args::parse().into_config()?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RATION_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    tokio::runtime::Runtime::new()?.block_on(ration_server::run(config, shutdown_signal()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
