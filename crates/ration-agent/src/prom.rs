//! A small `metrics` recorder that keeps counters and gauges (the SDK's and the
//! agent's) and renders them in Prometheus' text format. Histograms are not kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Counter,
    Gauge,
}

/// Counters and gauges by key (name and labels). Registering looks a key up under
/// a read lock, with no formatting: the SDK registers some counters per call.
#[derive(Debug, Default)]
pub struct Prom {
    series: RwLock<HashMap<Key, (Kind, Arc<AtomicU64>)>>,
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
        let found =
            self.series.read().unwrap_or_else(|p| p.into_inner()).get(key).map(|s| s.1.clone());
        if let Some(found) = found {
            return found;
        }
        let mut series = self.series.write().unwrap_or_else(|p| p.into_inner());
        series.entry(key.clone()).or_insert_with(|| (kind, Arc::new(AtomicU64::new(0)))).1.clone()
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> String {
        let sorted: BTreeMap<(String, String), (Kind, u64)> = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(key, (kind, value))| {
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| {
                        let v = l.value().replace('\\', "\\\\").replace('"', "\\\"");
                        format!("{}=\"{v}\"", l.key())
                    })
                    .collect();
                ((key.name().to_owned(), labels.join(",")), (*kind, value.load(Ordering::Relaxed)))
            })
            .collect();
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), (kind, v)) in sorted.iter() {
            if name != last {
                if let Some(h) = help.get(name) {
                    out += &format!("# HELP {name} {h}\n");
                }
                let t = if *kind == Kind::Counter { "counter" } else { "gauge" };
                out += &format!("# TYPE {name} {t}\n");
                last = name;
            }
            let v =
                if *kind == Kind::Gauge { f64::from_bits(*v).to_string() } else { v.to_string() };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_in_prometheus_text_format() {
        let prom = Arc::new(Prom::default());
        metrics::with_local_recorder(&Handle(prom.clone()), || {
            metrics::describe_counter!("calls_total", "Calls answered.");
            metrics::counter!("calls_total", "code" => "ok").increment(2);
            metrics::counter!("calls_total", "code" => "ok").increment(1);
            metrics::counter!("calls_total", "code" => "over \"x\"").increment(1);
            metrics::gauge!("pending").set(2.5);
        });
        assert_eq!(
            prom.render(),
            "# HELP calls_total Calls answered.\n# TYPE calls_total counter\n\
             calls_total{code=\"ok\"} 3\ncalls_total{code=\"over \\\"x\\\"\"} 1\n\
             # TYPE pending gauge\npending 2.5\n"
        );
    }
}
