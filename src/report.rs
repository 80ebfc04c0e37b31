//! The run record of the Quad loop (per round: pulls, rewards, cluster scores, influences,
//! selections by source; the pool's mix; the costs) and `quad report`, which renders it as a
//! self-contained HTML page with inline SVG plots (no scripts, no external files).
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cost::Costs;
use crate::error::StateError;
use crate::plot::{bar_chart, escape, histogram, line_chart, Series};
use crate::state::{EpochRecord, StateStore};

pub use crate::bandit::record::{PullRecord, RoundRecord};

/// Everything `quad report` shows about a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub strategy: String,
    /// The influence threshold, when the strategy uses one.
    pub tau: Option<f64>,
    pub rounds: Vec<RoundRecord>,
    /// The pool's tokens by source domain.
    pub pool_tokens_by_source: BTreeMap<String, u64>,
    /// The selected tokens by source domain, over the closed output files.
    #[serde(default)]
    pub selected_mix: BTreeMap<String, u64>,
    pub costs: Option<Costs>,
    /// What ingest kept and rejected, summed over the committed epochs.
    #[serde(default)]
    pub ingest: IngestCounts,
}

/// Rows ingest read, kept and rejected by reason, over the job's life.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IngestCounts {
    pub rows: u64,
    pub documents: u64,
    /// Bad rows (null or empty id or text, unusable embedding).
    pub rejected: u64,
    pub duplicate_ids: u64,
    pub duplicate_texts: u64,
    pub near_duplicates: u64,
    #[serde(default)]
    pub semantic_duplicates: u64,
}

impl IngestCounts {
    /// Sums the committed epochs' records: O(epochs).
    pub fn load(store: &StateStore) -> Result<IngestCounts, StateError> {
        let records = store.epochs()?;
        let sum = |count: fn(&EpochRecord) -> u64| records.values().map(count).sum();
        Ok(IngestCounts {
            rows: sum(|r| r.rows),
            documents: sum(|r| r.docs),
            rejected: sum(|r| r.rejected),
            duplicate_ids: sum(|r| r.duplicates),
            duplicate_texts: sum(|r| r.duplicate_texts),
            near_duplicates: sum(|r| r.near_duplicates),
            semantic_duplicates: sum(|r| r.semantic_duplicates),
        })
    }
}

/// Keys of the run values in the state store.
pub const POOL_MIX_KEY: &str = "pool_tokens_by_source";
pub const COSTS_KEY: &str = "costs";

/// The pool's tokens by the shards' `source` column (`(none)` where a shard or a row has none):
/// what the report compares the selection's mix with. Each epoch tallies its accepted documents
/// when it commits (`EpochRecord::tokens_by_source`), so this reads O(epochs) records and never
/// a shard.
pub fn update_pool_tokens_by_source(store: &StateStore) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut total = BTreeMap::new();
    for record in store.epochs()?.values() {
        for (source, tokens) in &record.tokens_by_source {
            *total.entry(source.clone()).or_insert(0) += tokens;
        }
    }
    Ok(total)
}

impl RunRecord {
    /// Reads a run's record from its state store.
    pub fn load(
        store: &StateStore,
        name: &str,
        strategy: &str,
        tau: Option<f64>,
    ) -> Result<RunRecord, StateError> {
        Ok(RunRecord {
            name: name.to_string(),
            strategy: strategy.to_string(),
            tau,
            rounds: store.round_records()?,
            pool_tokens_by_source: store.run_value(POOL_MIX_KEY)?.unwrap_or_default(),
            selected_mix: store.selected_tokens_by_source()?,
            costs: store.run_value(COSTS_KEY)?,
            ingest: IngestCounts::load(store)?,
        })
    }

    pub fn selected_tokens_by_source(&self) -> BTreeMap<String, u64> {
        if !self.selected_mix.is_empty() {
            return self.selected_mix.clone();
        }
        let mut out = BTreeMap::new();
        for r in &self.rounds {
            for (s, t) in &r.selected_tokens_by_source {
                *out.entry(s.clone()).or_insert(0) += t;
            }
        }
        out
    }
}

/// Writes the report of the job whose spec is at `job` to `out` (default
/// `<sink.path>/report.html`) and returns its path.
pub fn write_report(job: &Path, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let spec = crate::config::JobSpec::load(job)?;
    let state = spec.state_path();
    if !state.exists() {
        anyhow::bail!(
            "{}: no state store at {}; run the job first",
            job.display(),
            state.display()
        );
    }
    let store = StateStore::open(&state, &spec.selection_fingerprint())?;
    let strategy = serde_json::to_value(spec.select.strategy)?
        .as_str()
        .unwrap_or("?")
        .to_string();
    let uses_tau = matches!(
        spec.select.strategy,
        crate::config::Strategy::Quad | crate::config::Strategy::Exploit
    );
    // The threshold the last round applied: `tau`, or with `tau_quantile` that quantile of
    // the scores seen, which the stored bandit knows.
    let tau = match store.bandit()? {
        Some(bandit) => bandit.threshold(),
        None => spec.bandit.tau,
    };
    let record = RunRecord::load(&store, &spec.name, &strategy, uses_tau.then_some(tau))?;
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| spec.sink.path.join("report.html"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, render_html(&record))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Percentages of a token mix over `keys`.
fn shares(mix: &BTreeMap<String, u64>, keys: &[String]) -> Vec<f64> {
    let total: u64 = mix.values().sum();
    keys.iter()
        .map(|k| {
            let t = mix.get(k).copied().unwrap_or(0);
            if total == 0 {
                0.0
            } else {
                100.0 * t as f64 / total as f64
            }
        })
        .collect()
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0u64), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// A page being drawn: its figures (heading, SVG) and its notes about what is missing.
#[derive(Default)]
struct Page {
    figures: Vec<(String, String)>,
    notes: Vec<String>,
}

/// The page: a summary table, then one figure per plot that has data, and the costs.
pub fn render_html(run: &RunRecord) -> String {
    let mut page = Page::default();
    page.rewards(run);
    page.cluster_pulls(run);
    let scored = page.influence(run);
    page.source_mix(run);
    let cost_table = page.costs(run);
    page.html(run, scored, &cost_table)
}

impl Page {
    /// Rewards over rounds.
    fn rewards(&mut self, run: &RunRecord) {
        let Page { figures, notes } = self;
        let mean_reward: Vec<(f64, f64)> = run
            .rounds
            .iter()
            .filter_map(|r| {
                mean(r.pulls.iter().filter_map(|p| p.reward)).map(|m| (r.round as f64, m))
            })
            .collect();
        let max_reward: Vec<(f64, f64)> = run
            .rounds
            .iter()
            .filter_map(|r| {
                r.pulls
                    .iter()
                    .filter_map(|p| p.reward)
                    .reduce(f64::max)
                    .map(|m| (r.round as f64, m))
            })
            .collect();
        if mean_reward.is_empty() {
            notes.push("No rewards: this strategy does not score samples per cluster.".into());
        } else {
            let series: Vec<Series> = vec![("mean r_i", mean_reward), ("max r_i", max_reward)];
            let markers: Vec<(f64, &str)> = Vec::new();
            figures.push((
                "Rewards over rounds".into(),
                line_chart(
                    "Rewards per round",
                    "round",
                    "reward (mean influence)",
                    &series,
                    &markers,
                ),
            ));
        }
    }

    /// Cluster scores of the most pulled clusters, over the rounds they were chosen in, and
    /// the pulls per cluster.
    fn cluster_pulls(&mut self, run: &RunRecord) {
        let Page { figures, notes } = self;
        let mut pulls_per_cluster: BTreeMap<u32, u64> = BTreeMap::new();
        for r in &run.rounds {
            for p in &r.pulls {
                *pulls_per_cluster.entry(p.cluster).or_insert(0) += 1;
            }
        }
        let mut most: Vec<(u32, u64)> = pulls_per_cluster.iter().map(|(&c, &n)| (c, n)).collect();
        most.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let names: Vec<String> = most
            .iter()
            .take(5)
            .map(|(c, _)| format!("cluster {c}"))
            .collect();
        let score_series: Vec<Series> = most
            .iter()
            .take(5)
            .zip(&names)
            .map(|((c, _), name)| {
                let pts = run
                    .rounds
                    .iter()
                    .flat_map(|r| {
                        r.pulls
                            .iter()
                            .filter(|p| p.cluster == *c)
                            .filter_map(move |p| p.cluster_score.map(|s| (r.round as f64, s)))
                    })
                    .collect();
                (name.as_str(), pts)
            })
            .filter(|(_, pts): &(&str, Vec<(f64, f64)>)| !pts.is_empty())
            .collect();
        if score_series.is_empty() {
            notes.push("No cluster scores: this strategy does not rank clusters by UCB.".into());
        } else {
            figures.push((
                "Cluster scores over rounds".into(),
                line_chart(
                    "UCB score CS_i when chosen (most pulled clusters)",
                    "round",
                    "CS_i",
                    &score_series,
                    &[],
                ),
            ));
        }

        // Pulls per cluster.
        if !pulls_per_cluster.is_empty() {
            let cats: Vec<String> = pulls_per_cluster.keys().map(|c| c.to_string()).collect();
            let counts: Vec<f64> = pulls_per_cluster.values().map(|&n| n as f64).collect();
            figures.push((
                "Pulls per cluster".into(),
                bar_chart(
                    "Pulls per cluster",
                    "cluster",
                    "pulls",
                    &cats,
                    &[("pulls", counts)],
                ),
            ));
        }
    }

    /// Influence distribution with tau; returns the number of scored documents.
    fn influence(&mut self, run: &RunRecord) -> usize {
        let Page { figures, notes } = self;
        let influences: Vec<f64> = run
            .rounds
            .iter()
            .flat_map(|r| r.influences.iter().copied())
            .collect();
        if influences.is_empty() {
            notes.push("No influence scores were recorded.".into());
        } else {
            let tau_label = run.tau.map(|t| format!("tau = {t}"));
            let markers: Vec<(f64, &str)> = run
                .tau
                .iter()
                .zip(tau_label.iter())
                .map(|(&t, l)| (t, l.as_str()))
                .collect();
            figures.push((
                "Influence distribution".into(),
                histogram(
                    &format!("Influence of the {} scored documents", influences.len()),
                    "influence I(z)",
                    &influences,
                    30,
                    &markers,
                ),
            ));
        }
        influences.len()
    }

    /// Selected tokens per source against the pool's mix.
    fn source_mix(&mut self, run: &RunRecord) {
        let Page { figures, notes } = self;
        let selected_mix = run.selected_tokens_by_source();
        let mut sources: Vec<String> = run.pool_tokens_by_source.keys().cloned().collect();
        for s in selected_mix.keys() {
            if !sources.contains(s) {
                sources.push(s.clone());
            }
        }
        if sources.is_empty() {
            notes.push("No source mix was recorded.".into());
        } else {
            figures.push((
                "Selected tokens per source domain".into(),
                bar_chart(
                    "Share of tokens per source domain",
                    "source",
                    "% of tokens",
                    &sources,
                    &[
                        ("pool", shares(&run.pool_tokens_by_source, &sources)),
                        ("selected", shares(&selected_mix, &sources)),
                    ],
                ),
            ));
        }
    }

    /// The compute figure; returns the cost table.
    fn costs(&mut self, run: &RunRecord) -> String {
        let Page { figures, notes } = self;
        let mut cost_table = String::new();
        if let Some(c) = &run.costs {
            let cats: Vec<String> = c.stages().iter().map(|(s, _)| s.to_string()).collect();
            let flops: Vec<f64> = c.stages().iter().map(|(_, f)| *f).collect();
            figures.push((
                "Compute".into(),
                bar_chart(
                    "FLOPs per stage",
                    "stage",
                    "FLOPs",
                    &cats,
                    &[("FLOPs", flops)],
                ),
            ));
            let _ = write!(
            cost_table,
            "<table><tr><th>stage</th><th>FLOPs</th></tr>{}<tr><td>total</td><td>{:.3e}</td></tr></table>\
             <p>Scored {} of {} documents ({:.2}% of the pool), {} tokens.</p>",
            c.stages()
                .iter()
                .map(|(s, f)| format!("<tr><td>{s}</td><td>{f:.3e}</td></tr>"))
                .collect::<String>(),
            c.total_flops(),
            c.docs_scored,
            c.pool_docs,
            100.0 * c.pool_fraction_scored(),
            c.tokens_scored
        );
        } else {
            notes.push("No cost figures were recorded.".into());
        }
        cost_table
    }

    /// The whole page: the summary table, the figures, the cost table and the notes.
    fn html(&self, run: &RunRecord, scored: usize, cost_table: &str) -> String {
        let Page { figures, notes } = self;
        let selected_docs: u64 = run.rounds.iter().map(|r| r.selected_docs).sum();
        let selected_tokens = run.rounds.last().map_or(0, |r| r.total_selected_tokens);
        let mut html = String::new();
        let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>quad report: {name}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}}figure{{margin:1.5em 0}}</style></head>\n<body>\n\
         <h1>quad report: {name}</h1>\n<table><tr><th>strategy</th><td>{strategy}</td></tr>\
         <tr><th>rounds</th><td>{rounds}</td></tr><tr><th>documents scored</th><td>{scored}</td></tr>\
         <tr><th>documents selected</th><td>{selected_docs}</td></tr><tr><th>tokens selected</th><td>{selected_tokens}</td></tr>\
         <tr><th>tau</th><td>{tau}</td></tr><tr><th>rows read</th><td>{rows}</td></tr>\
         <tr><th>documents kept</th><td>{documents}</td></tr><tr><th>rows rejected (bad)</th><td>{rejected}</td></tr>\
         <tr><th>duplicate ids</th><td>{ids}</td></tr><tr><th>duplicate texts</th><td>{texts}</td></tr>\
         <tr><th>near duplicates</th><td>{near}</td></tr>\
         <tr><th>semantic duplicates</th><td>{semantic}</td></tr></table>\n",
        name = escape(&run.name),
        strategy = escape(&run.strategy),
        rounds = run.rounds.len(),
        tau = run.tau.map_or("-".to_string(), |t| t.to_string()),
        rows = run.ingest.rows,
        documents = run.ingest.documents,
        rejected = run.ingest.rejected,
        ids = run.ingest.duplicate_ids,
        texts = run.ingest.duplicate_texts,
        near = run.ingest.near_duplicates,
        semantic = run.ingest.semantic_duplicates,
    );
        for (heading, svg) in figures {
            let _ = write!(
                html,
                "<h2>{}</h2>\n<figure class=\"plot\">\n{svg}</figure>\n",
                escape(heading)
            );
        }
        html.push_str(cost_table);
        for note in notes {
            let _ = write!(html, "<p class=\"note\">{}</p>\n", escape(note));
        }
        html.push_str("</body></html>\n");
        html
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunRecord {
        let round = |r: u64, reward: f64| RoundRecord {
            round: r,
            pulls: vec![PullRecord {
                cluster: r as u32 % 3,
                sampled: 4,
                cluster_score: (r > 2).then_some(1.0 + reward),
                reward: Some(reward),
            }],
            influences: vec![reward - 0.1, reward, reward + 0.1],
            selected_docs: 2,
            selected_tokens: 20,
            total_selected_tokens: 20 * (r + 1),
            selected_tokens_by_source: [("news".to_string(), 20)].into(),
        };
        RunRecord {
            name: "t<1>".into(),
            strategy: "quad".into(),
            tau: Some(0.0),
            rounds: (0..6).map(|r| round(r, r as f64 * 0.1)).collect(),
            pool_tokens_by_source: [("news".to_string(), 100), ("email".to_string(), 300)].into(),
            selected_mix: BTreeMap::new(),
            costs: Some(Costs {
                embed_flops: 1e9,
                factor_flops: 2e9,
                score_flops: 3e9,
                docs_scored: 18,
                pool_docs: 40,
                ..Default::default()
            }),
            ingest: IngestCounts {
                duplicate_texts: 7,
                near_duplicates: 3,
                ..Default::default()
            },
        }
    }

    #[test]
    fn every_plot_is_in_the_page() {
        let html = render_html(&run());
        assert_eq!(
            html.matches("<svg").count(),
            6,
            "rewards, scores, pulls, influence, mix, costs"
        );
        assert!(html.contains("t&lt;1&gt;"));
        assert!(html.contains("tau = 0"));
        assert!(html.contains("45.00% of the pool"));
        assert!(html.contains("<th>duplicate texts</th><td>7</td>"));
        assert!(html.contains("<th>near duplicates</th><td>3</td>"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn missing_parts_are_named_not_drawn() {
        let html = render_html(&RunRecord {
            name: "empty".into(),
            ..Default::default()
        });
        assert_eq!(html.matches("<svg").count(), 0);
        assert!(html.contains("No cost figures"));
    }
}
