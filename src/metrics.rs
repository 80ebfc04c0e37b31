//! Prometheus metrics of a running job (`runtime.metrics_addr`): O(1) counters, updated where
//! the run's summary is, served in the text format at `/metrics` by a small blocking HTTP
//! server on a thread of its own. The README's Operations section lists them.
//!
//! Every metric carries the labels `quad_job` (the job's name; not `job`, which Prometheus
//! sets to the scrape job's name) and `process` (0 until a job runs in several processes).
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Why the metrics cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("runtime.metrics_addr {addr}: cannot listen: {message}")]
    Listen { addr: String, message: String },
    #[error("metrics: {0}")]
    Registry(#[from] prometheus::Error),
}

/// The job's metrics. Counters count this process's run (they start at 0 when it starts).
pub struct Metrics {
    registry: Registry,
    pub rows_read: IntCounter,
    pub documents: IntCounter,
    pub rejected: IntCounterVec,
    pub duplicates: IntCounter,
    pub shards_found: IntCounter,
    pub shards_done: IntCounter,
    pub shards_quarantined: IntCounter,
    pub epochs_committed: IntCounter,
    pub epochs_in_flight: IntGauge,
    pub clusters: IntGauge,
    pub rounds: IntCounter,
    pub scored_documents: IntCounter,
    pub scored_tokens: IntCounter,
    pub scoring_documents_per_second: Gauge,
    pub selected_documents: IntCounter,
    pub selected_tokens: IntCounter,
    pub flops: CounterVec,
    pub state_store_bytes: IntGauge,
    pub seconds_since_last_commit: Gauge,
    started: Instant,
    last_commit: Mutex<Option<Instant>>,
    cluster_ids: Mutex<HashSet<u32>>,
}

impl Metrics {
    pub fn new(job: &str, process: usize) -> Result<Metrics, MetricsError> {
        let labels = [
            ("quad_job".to_string(), job.to_string()),
            ("process".to_string(), process.to_string()),
        ]
        .into_iter()
        .collect();
        let registry = Registry::new_custom(Some("quad".into()), Some(labels))?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let float_gauge = |name: &str, help: &str| -> Result<Gauge, MetricsError> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let rejected = IntCounterVec::new(
            Opts::new(
                "rejected_rows_total",
                "Rows rejected, by the kind of reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rejected.clone()))?;
        let flops = CounterVec::new(
            Opts::new("flops_total", "Floating-point operations spent, by stage"),
            &["stage"],
        )?;
        registry.register(Box::new(flops.clone()))?;
        Ok(Metrics {
            rows_read: counter("rows_read_total", "Rows read from shards")?,
            documents: counter(
                "documents_total",
                "Documents accepted (not rejected, not duplicate)",
            )?,
            rejected,
            duplicates: counter(
                "duplicate_documents_total",
                "Rows whose id was accepted before",
            )?,
            shards_found: counter("shards_found_total", "Shards found to process")?,
            shards_done: counter("shards_done_total", "Shards committed")?,
            shards_quarantined: counter(
                "shards_quarantined_total",
                "Shards quarantined (unreadable)",
            )?,
            epochs_committed: counter(
                "epochs_committed_total",
                "Epochs (shards) committed, quarantined ones included",
            )?,
            epochs_in_flight: gauge("epochs_in_flight", "Epochs read and not yet committed")?,
            clusters: gauge("clusters", "Clusters that have members")?,
            rounds: counter("bandit_rounds_total", "Bandit rounds committed")?,
            scored_documents: counter(
                "scored_documents_total",
                "Documents whose influence was computed",
            )?,
            scored_tokens: counter("scored_tokens_total", "Tokens of the scored documents")?,
            scoring_documents_per_second: float_gauge(
                "scoring_documents_per_second",
                "Documents scored per second of scoring",
            )?,
            selected_documents: counter("selected_documents_total", "Documents selected")?,
            selected_tokens: counter("selected_tokens_total", "Tokens of the selected documents")?,
            flops,
            state_store_bytes: gauge("state_store_bytes", "Size of the state store's file")?,
            seconds_since_last_commit: float_gauge(
                "seconds_since_last_commit",
                "Seconds since the last epoch or round commit (since the start before the first)",
            )?,
            registry,
            started: Instant::now(),
            last_commit: Mutex::new(None),
            cluster_ids: Mutex::new(HashSet::new()),
        })
    }

    /// A rejected row of this kind (`source::Reject::kind`).
    pub fn reject(&self, kind: &str) {
        self.rejected.with_label_values(&[kind]).inc();
    }

    /// An epoch or round commit just happened.
    pub fn committed(&self) {
        *self.last_commit.lock().expect("last commit") = Some(Instant::now());
    }

    /// Clusters seen with members (the store's at the start, then those commits update).
    pub fn clusters_seen(&self, ids: impl IntoIterator<Item = u32>) {
        let mut seen = self.cluster_ids.lock().expect("cluster ids");
        seen.extend(ids);
        self.clusters.set(seen.len() as i64);
    }

    /// Raises a float counter to `total` (this run's total, recomputed at a scrape).
    pub fn raise_to(counter: &Counter, total: f64) {
        let now = counter.get();
        if total > now {
            counter.inc_by(total - now);
        }
    }

    /// The text format of every metric.
    pub fn render(&self) -> String {
        let since = self
            .last_commit
            .lock()
            .expect("last commit")
            .unwrap_or(self.started);
        self.seconds_since_last_commit
            .set(since.elapsed().as_secs_f64());
        let mut out = Vec::new();
        // Encoding into memory fails only for invalid metric names, which are fixed above.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("metrics: cannot encode: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Sets the gauges that are read, not counted, just before a scrape (store size, FLOPs).
pub type Refresh = Box<dyn Fn(&Metrics) + Send>;

/// The HTTP server of `/metrics`; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: String,
}

/// Serves `metrics` at `http://addr/metrics` until the returned server is dropped.
pub fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    refresh: Refresh,
) -> Result<MetricsServer, MetricsError> {
    let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Listen {
        addr: addr.to_string(),
        message: e.to_string(),
    })?;
    let server = Arc::new(server);
    let bound = server
        .server_addr()
        .to_ip()
        .map_or_else(|| addr.to_string(), |a| a.to_string());
    let serving = server.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in serving.incoming_requests() {
                answer(request, &metrics, &refresh);
            }
        })
        .map_err(|e| MetricsError::Listen {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
    Ok(MetricsServer {
        server,
        thread: Some(thread),
        addr: bound,
    })
}

fn answer(request: tiny_http::Request, metrics: &Metrics, refresh: &Refresh) {
    let path = request.url().split('?').next().unwrap_or_default();
    let response = if path == "/metrics" {
        refresh(metrics);
        let content_type = tiny_http::Header::from_bytes(
            &b"Content-Type"[..],
            &b"text/plain; version=0.0.4; charset=utf-8"[..],
        )
        .expect("a valid header");
        tiny_http::Response::from_string(metrics.render()).with_header(content_type)
    } else {
        tiny_http::Response::from_string("quad serves /metrics\n").with_status_code(404)
    };
    // A scraper that went away is not the job's problem.
    let _ = request.respond(response);
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `text` has a sample of `name` with all of `labels` (in any order) and `value`.
    fn has_sample(text: &str, name: &str, labels: &[&str], value: &str) -> bool {
        text.lines().any(|line| {
            line.starts_with(&format!("{name}{{"))
                && line.ends_with(&format!("}} {value}"))
                && labels.iter().all(|l| line.contains(l))
        })
    }

    #[test]
    fn metrics_render_with_the_job_and_process_labels() {
        let m = Metrics::new("demo", 0).unwrap();
        m.rows_read.inc_by(7);
        m.reject("text is empty");
        m.reject("text is empty");
        m.clusters_seen([3, 5, 3]);
        Metrics::raise_to(&m.flops.with_label_values(&["embed"]), 2.5e9);
        Metrics::raise_to(&m.flops.with_label_values(&["embed"]), 1.0);
        let text = m.render();
        let job = [r#"process="0""#, r#"quad_job="demo""#];
        assert!(
            has_sample(&text, "quad_rows_read_total", &job, "7"),
            "{text}"
        );
        let empty = [job[0], job[1], r#"reason="text is empty""#];
        assert!(
            has_sample(&text, "quad_rejected_rows_total", &empty, "2"),
            "{text}"
        );
        assert!(has_sample(&text, "quad_clusters", &job, "2"), "{text}");
        let embed = [job[0], job[1], r#"stage="embed""#];
        assert!(
            has_sample(&text, "quad_flops_total", &embed, "2500000000"),
            "{text}"
        );
    }

    #[test]
    fn the_server_answers_metrics_and_404() {
        use std::io::{Read, Write};
        let m = Arc::new(Metrics::new("served", 0).unwrap());
        m.documents.inc_by(3);
        let refresh: Refresh = Box::new(|m: &Metrics| m.state_store_bytes.set(42));
        let server = serve("127.0.0.1:0", m, refresh).unwrap();
        let get = |path: &str| {
            let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text
        };
        let text = get("/metrics");
        assert!(text.lines().next().unwrap().contains(" 200 "), "{text}");
        assert!(text.contains("quad_documents_total{"), "{text}");
        let job = [r#"process="0""#, r#"quad_job="served""#];
        assert!(
            has_sample(&text, "quad_state_store_bytes", &job, "42"),
            "{text}"
        );
        assert!(get("/").lines().next().unwrap().contains(" 404 "));
    }
}
