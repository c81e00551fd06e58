//! Log lines as an operator reads them: on stderr, colour only on a terminal, the
//! node id on every line, dependency noise filtered, and warnings or errors that
//! repeat (a peer that is down makes openraft report every retry) collapsed.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The default filter: our own INFO lines; openraft and sled only when they warn.
pub const DEFAULT_FILTER: &str = "info,openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn";

/// Libraries whose DEBUG and INFO lines are noise to an operator: kept at WARN
/// unless `RATION_LOG` names them.
const QUIET: [&str; 5] = ["sled", "h2", "hyper", "tower", "tonic"];

/// The filter for `RATION_LOG` (None: [`DEFAULT_FILTER`]): `RATION_LOG=debug` means
/// Ration's and openraft's debug lines, not sled's internals.
pub fn filter(ration_log: Option<&str>) -> String {
    match ration_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => DEFAULT_FILTER.to_owned(),
        Some(given) => {
            let mut f = given.to_owned();
            for lib in QUIET.iter().filter(|lib| !given.contains(*lib)) {
                f.push_str(&format!(",{lib}=warn"));
            }
            f
        }
    }
}

/// How many WARN or ERROR lines one call site may write per [`WINDOW`].
pub const PER_CALLSITE: u32 = 3;
/// The window over which repeated lines are counted.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Writes each formatted event with the node id: `[n1] ` before a text line,
/// `"node_id":1` as the first field of a JSON line. The fmt layer formats an event
/// into one buffer and writes it at once, so every write is one whole line.
#[derive(Clone, Debug)]
pub struct Tagged {
    node_id: u64,
    json: bool,
}

impl Tagged {
    pub fn new(node_id: u64, json: bool) -> Self {
        Self { node_id, json }
    }

    /// `line` with the node id added.
    pub fn tag(&self, line: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(line.len() + 16);
        match line.split_first() {
            Some((b'{', rest)) if self.json => {
                let sep = if rest.first() == Some(&b'}') { "" } else { "," };
                let _ = write!(out, "{{\"node_id\":{}{sep}", self.node_id);
                out.extend_from_slice(rest);
            }
            _ if self.json => out.extend_from_slice(line),
            _ => {
                let _ = write!(out, "[n{}] ", self.node_id);
                out.extend_from_slice(line);
            }
        }
        out
    }
}

/// The writer [`Tagged`] hands the fmt layer for each event.
pub struct TaggedWriter {
    tagged: Tagged,
}

impl Write for TaggedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(&self.tagged.tag(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Tagged {
    type Writer = TaggedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        TaggedWriter { tagged: self.clone() }
    }
}

/// Lets at most [`PER_CALLSITE`] WARN or ERROR events per call site through per
/// [`WINDOW`]; INFO and below always pass. What it held back is counted, per
/// target, for [`Repeats::summary`].
#[derive(Clone, Debug)]
pub struct Repeats {
    inner: Arc<Mutex<RepeatState>>,
    suppressed_total: Arc<AtomicU64>,
    per_callsite: u32,
    window: Duration,
}

#[derive(Debug, Default)]
struct RepeatState {
    /// Call site -> (window start, events let through in it).
    seen: HashMap<Identifier, (Instant, u32)>,
    /// Target -> events held back since the last summary.
    held: HashMap<String, u64>,
}

impl Default for Repeats {
    fn default() -> Self {
        Self::new(PER_CALLSITE, WINDOW)
    }
}

impl Repeats {
    pub fn new(per_callsite: u32, window: Duration) -> Self {
        Self { inner: Arc::default(), suppressed_total: Arc::default(), per_callsite, window }
    }

    /// Whether an event with `meta` is written (at `now`).
    pub fn allow(&self, meta: &Metadata<'_>, now: Instant) -> bool {
        if !meta.is_event() || *meta.level() > Level::WARN {
            return true;
        }
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = s.seen.entry(meta.callsite()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 < self.per_callsite {
            entry.1 += 1;
            return true;
        }
        *s.held.entry(meta.target().to_owned()).or_insert(0) += 1;
        self.suppressed_total.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Lines held back since the last summary, by target, most first; and resets.
    pub fn summary(&self) -> Vec<(String, u64)> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut held: Vec<(String, u64)> = s.held.drain().collect();
        held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        // Forget call sites idle for a whole window, so the map stays small.
        let window = self.window;
        s.seen.retain(|_, (start, _)| start.elapsed() < window * 2);
        held
    }

    /// Lines held back since the process started.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// As a per-layer filter: decided per event (never cached per call site).
impl<S> tracing_subscriber::layer::Filter<S> for Repeats {
    fn enabled(&self, meta: &Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.allow(meta, Instant::now())
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
}

/// Every [`WINDOW`], one WARN line saying how many repeated lines were held back
/// and from where (nothing when none were); the count goes to /metrics
/// (`ration_log_lines_suppressed_total`).
pub async fn report_repeats(repeats: Repeats) {
    let mut tick = tokio::time::interval(repeats.window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = 0;
    loop {
        tick.tick().await;
        let held = repeats.summary();
        if held.is_empty() {
            continue;
        }
        let total: u64 = held.iter().map(|(_, n)| n).sum();
        let from: Vec<String> = held.iter().map(|(t, n)| format!("{t}: {n}")).collect();
        tracing::warn!(
            "{total} repeated warning/error lines held back in the last {} s ({})",
            repeats.window.as_secs(),
            from.join(", ")
        );
        let now = repeats.suppressed_total();
        ration_server::metrics::LOG_LINES_SUPPRESSED.fetch_add(now - reported, Ordering::Relaxed);
        reported = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_filter_keeps_library_noise_out_unless_it_names_the_library() {
        assert_eq!(filter(None), DEFAULT_FILTER);
        assert_eq!(filter(Some("  ")), DEFAULT_FILTER);
        assert_eq!(
            filter(Some("debug")),
            "debug,sled=warn,h2=warn,hyper=warn,tower=warn,tonic=warn"
        );
        assert_eq!(
            filter(Some("debug,sled=debug")),
            "debug,sled=debug,h2=warn,hyper=warn,tower=warn,tonic=warn"
        );
    }

    #[test]
    fn text_lines_get_the_node_id_in_front_and_json_lines_a_first_field() {
        let text = Tagged::new(3, false);
        assert_eq!(text.tag(b"2026 INFO x: hi\n"), b"[n3] 2026 INFO x: hi\n");
        let json = Tagged::new(3, true);
        assert_eq!(json.tag(b"{\"level\":\"INFO\"}\n"), b"{\"node_id\":3,\"level\":\"INFO\"}\n");
        assert_eq!(json.tag(b"{}\n"), b"{\"node_id\":3}\n");
    }

    #[test]
    fn repeated_warnings_from_one_call_site_are_held_back_per_window() {
        let repeats = Repeats::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let warn = tracing::Metadata::new(
            "w",
            "openraft::replication",
            Level::WARN,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&PROBE)),
            tracing::metadata::Kind::EVENT,
        );
        static PROBE: ProbeCallsite = ProbeCallsite;
        struct ProbeCallsite;
        impl tracing::callsite::Callsite for ProbeCallsite {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unimplemented!("not registered")
            }
        }
        let allowed = (0..10).filter(|_| repeats.allow(&warn, t0)).count();
        assert_eq!(allowed, 3);
        assert_eq!(repeats.summary(), vec![("openraft::replication".to_owned(), 7)]);
        // A new window lets lines through again.
        assert!(repeats.allow(&warn, t0 + Duration::from_secs(10)));
        assert_eq!(repeats.suppressed_total(), 7);
        // INFO lines are never held back.
        let info = tracing::Metadata::new(
            "i",
            "ration_server",
            Level::INFO,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&PROBE)),
            tracing::metadata::Kind::EVENT,
        );
        assert!((0..10).all(|_| repeats.allow(&info, t0)));
    }
}
