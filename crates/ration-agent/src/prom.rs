//! A small `metrics` recorder that keeps counters and gauges (the SDK's and the
//! agent's) and renders them in Prometheus' text format. Histograms are not kept.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Counter,
    Gauge,
}

/// (name, rendered labels).
type Series = (String, String);

/// Counters and gauges by series.
#[derive(Debug, Default)]
pub struct Prom {
    series: Mutex<BTreeMap<Series, (Kind, Arc<AtomicU64>)>>,
    help: Mutex<BTreeMap<String, String>>,
}

impl Prom {
    /// Installs a recorder as the process's global one; returns it (or the
    /// error if one is already installed).
    pub fn install() -> Result<Arc<Self>, String> {
        let prom = Arc::new(Self::default());
        metrics::set_global_recorder(Handle(prom.clone())).map_err(|e| e.to_string())?;
        Ok(prom)
    }

    fn series(&self, key: &Key, kind: Kind) -> Arc<AtomicU64> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| {
                format!("{}=\"{}\"", l.key(), l.value().replace('\\', "\\\\").replace('"', "\\\""))
            })
            .collect();
        let id = (key.name().to_owned(), labels.join(","));
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.entry(id).or_insert_with(|| (kind, Arc::new(AtomicU64::new(0)))).1.clone()
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> String {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), (kind, value)) in series.iter() {
            if name != last {
                if let Some(h) = help.get(name) {
                    out += &format!("# HELP {name} {h}\n");
                }
                let t = if *kind == Kind::Counter { "counter" } else { "gauge" };
                out += &format!("# TYPE {name} {t}\n");
                last = name;
            }
            let v = value.load(Ordering::Relaxed);
            let v =
                if *kind == Kind::Gauge { f64::from_bits(v).to_string() } else { v.to_string() };
            if labels.is_empty() {
                out += &format!("{name} {v}\n");
            } else {
                out += &format!("{name}{{{labels}}} {v}\n");
            }
        }
        out
    }
}

#[derive(Debug)]
struct Handle(Arc<Prom>);

impl Recorder for Handle {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.series(key, Kind::Counter))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.series(key, Kind::Gauge))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

impl Handle {
    fn describe(&self, key: KeyName, description: SharedString) {
        let mut help = self.0.help.lock().unwrap_or_else(|p| p.into_inner());
        help.insert(key.as_str().to_owned(), description.to_string());
    }
}
