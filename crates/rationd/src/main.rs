//! `rationd`: parse the configuration, set up logging, run the node until SIGTERM
//! or ctrl-c.

/// mimalloc: glibc malloc was a fifth of a node's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod logs;

use clap::Parser;
use ration_server::config::Args;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

fn main() -> anyhow::Result<()> {
    let config = Args::parse().into_config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    // The OTLP exporter needs the runtime while it is built.
    let _entered = runtime.enter();
    let filter = tracing_subscriber::EnvFilter::new(logs::filter(
        std::env::var("RATION_LOG").ok().as_deref(),
    ));
    // Logs go to stderr (stdout stays free for output a script might read), with
    // colour only when stderr is a terminal, the node id on every line, and
    // repeated warnings held back (`logs::Repeats`).
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal();
    let json = config.log_format == "json";
    let writer = logs::Tagged::new(config.node_id, json);
    let repeats = logs::Repeats::default();
    let logs = if json {
        tracing_subscriber::fmt::layer().json().with_writer(writer).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi).boxed()
    };
    // One filter (the level filter, then the repeats), not one per layer: a span
    // or event the level filter drops is then never recorded at all, where two
    // nested per-layer filters had the registry keep every span of every library
    // for the outer one (about 4% of a node's CPU with one operation per RPC).
    use tracing_subscriber::filter::FilterExt as _;
    let logs = logs.with_filter(filter.and(repeats.clone()));
    #[allow(unused_mut)] // the otel feature adds a layer
    let mut layers = vec![logs.boxed()];
    #[cfg(feature = "otel")]
    let tracer = {
        let (layer, tracer) = otel::layer()?;
        layers.extend(layer);
        tracer
    };
    tracing_subscriber::registry().with(layers).init();
    // A panic on any thread (say, the state machine's worker) would otherwise leave
    // a process that answers every write with "outcome unknown" and never restarts.
    // A replica that cannot apply must stop, so its supervisor restarts it and it
    // recovers from its log.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("panic: {info}; exiting so the node restarts from its log");
        std::process::exit(101);
    }));
    runtime.spawn(logs::report_repeats(repeats));
    let result = runtime.block_on(ration_server::run(config, shutdown_signal()));
    #[cfg(feature = "otel")]
    if let Some(tracer) = tracer {
        let _ = tracer.shutdown();
    }
    // One line, cause included ("cannot listen on ...: address already in use").
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Trace export to an OpenTelemetry collector, when built with `--features otel`
/// and `OTEL_EXPORTER_OTLP_ENDPOINT` is set (standard OTEL_* variables apply; the
/// service name defaults to `rationd`). Spans at `RATION_OTEL_LEVEL` (default info)
/// and above are exported.
#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer;

    pub type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

    pub fn layer() -> anyhow::Result<(Option<Boxed>, Option<SdkTracerProvider>)> {
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            return Ok((None, None));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "rationd".into());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder().with_service_name(service).build(),
            )
            .build();
        let tracer = provider.tracer("rationd");
        let level = std::env::var("RATION_OTEL_LEVEL").unwrap_or_else(|_| "info".into());
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::EnvFilter::new(level))
            .boxed();
        Ok((Some(layer), Some(provider)))
    }
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
