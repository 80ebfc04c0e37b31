//! `quad tune tau` and `quad tune gamma` (DESIGN 1.2): the bandit's threshold and sample ratio
//! measured on the job's own clusters with its influence model. Both read the clusters a
//! `quad run` committed to the state store, fetch member texts by location, and score them
//! with the scorer the `[influence]` section describes. (`quad tune k` is in [`k`].)
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::bandit::tune::{tau_candidates, tune_gamma, GammaTuning};
use crate::bandit::MemberRef;
use crate::config::JobSpec;
use crate::influence::scorer::InfluenceScorer;
use crate::model::CausalLm;
use crate::state::StateStore;
use crate::warmup::{reference_loss, train_texts, WarmupError};

pub mod k;

/// Seed streams of the tuning samples (apart from the bandit's and k-means').
const GAMMA_STREAM: u64 = 0x6a77_0001;
const TAU_STREAM: u64 = 0x7a75_0002;

/// Members of the committed clusters with their texts, per cluster (ascending id).
struct ClusterSample {
    clusters: Vec<(u32, Vec<MemberRef>)>,
    texts: HashMap<(u64, u64), String>,
}

impl ClusterSample {
    fn text(&self, m: &MemberRef) -> &str {
        self.texts
            .get(&(m.loc.shard, m.loc.row))
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// Opens the job's state store, takes up to `clusters` clusters (the largest, ties by id; all
/// when None) and up to `per_cluster` members of each (a seeded sample), and reads their texts.
fn sample_clusters(
    spec: &JobSpec,
    clusters: Option<usize>,
    per_cluster: usize,
    stream: u64,
) -> Result<ClusterSample> {
    let path = spec.state_path();
    if !path.exists() {
        bail!(
            "{}: no state store; tuning reads the job's clusters, so run `quad run` on it first",
            path.display()
        );
    }
    let store = StateStore::open_existing(&path)?;
    let mut infos = store.clusters()?;
    if infos.is_empty() {
        bail!(
            "{}: the job has no clusters yet (is [cluster] enabled and has `quad run` ingested a shard?)",
            path.display()
        );
    }
    infos.sort_by(|a, b| b.size.cmp(&a.size).then(a.cluster.cmp(&b.cluster)));
    infos.truncate(clusters.unwrap_or(usize::MAX));
    infos.sort_by_key(|c| c.cluster);
    let mut picked = Vec::new();
    let mut rows_by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for info in &infos {
        let members = store.members(info.cluster)?;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ stream ^ u64::from(info.cluster));
        let mut idx =
            rand::seq::index::sample(&mut rng, members.len(), per_cluster.min(members.len()))
                .into_vec();
        idx.sort_unstable();
        let refs: Vec<MemberRef> = idx
            .iter()
            .map(|&i| {
                let m = &members[i];
                rows_by_epoch.entry(m.epoch).or_default().push(m.row);
                MemberRef {
                    cluster: info.cluster,
                    loc: m.loc(),
                    tokens: u64::from(m.tokens),
                }
            })
            .collect();
        picked.push((info.cluster, refs));
    }
    let shards = store.shard_paths()?;
    let mut texts = HashMap::new();
    for (epoch, rows) in rows_by_epoch {
        let shard = shards
            .get(&epoch)
            .with_context(|| format!("epoch {epoch} has no shard in {}", path.display()))?;
        let cells = crate::source::fetch_cells(shard, &rows, &[spec.source.text_column.as_str()])?;
        for (row, mut c) in cells {
            texts.insert((epoch, row), c.pop().flatten().unwrap_or_default());
        }
    }
    Ok(ClusterSample {
        clusters: picked,
        texts,
    })
}

/// The job's scorer, fitted on the pool sample its store kept during ingest.
fn build_scorer(spec: &JobSpec) -> Result<InfluenceScorer> {
    let store = std::sync::Arc::new(StateStore::open_existing(&spec.state_path())?);
    let pool = crate::influence::setup::stored_fit_pool(
        &store,
        &spec.source,
        spec.influence.fit_pool_docs,
    )?;
    crate::influence::setup::build_scorer(&spec.influence, &spec.source, pool, spec.seed)
        .with_context(|| {
            format!(
                "building the influence scorer ({})",
                spec.influence.model.display()
            )
        })
}

/// The scores of the members that could be scored (an unscorable one has no score to tune on).
fn score_members(
    scorer: &mut InfluenceScorer,
    sample: &ClusterSample,
    members: &[MemberRef],
) -> Result<Vec<f64>> {
    let texts: Vec<&str> = members.iter().map(|m| sample.text(m)).collect();
    Ok(scorer
        .score(&texts)?
        .iter()
        .filter_map(|s| s.value())
        .collect())
}

/// Options of `quad tune gamma`.
#[derive(Debug, Clone)]
pub struct TuneGammaOptions {
    /// Clusters measured (the largest).
    pub clusters: usize,
    /// Members scored per cluster: the cluster's "full" mean is over these.
    pub members: usize,
    /// Largest ratio tried; ratios run 0.01, 0.02, ... up to it.
    pub max_ratio: f64,
    /// Relative error of the sample mean accepted (0.1 = 10%).
    pub tolerance: f64,
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneGammaReport {
    pub tuning: GammaTuning,
    pub clusters: usize,
    pub documents_scored: usize,
    pub seconds: f64,
    pub svg: PathBuf,
}

impl std::fmt::Display for TuneGammaReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "tune gamma: {} clusters, {} documents scored in {:.1} s",
            self.clusters, self.documents_scored, self.seconds
        )?;
        write!(f, "{}", self.tuning.table())?;
        write!(f, "plot: {}", self.svg.display())
    }
}

/// `quad tune gamma`: for the largest clusters, the mean influence of (up to) `members`
/// scored members stands for the cluster's; the smallest sample ratio whose seeded sample mean
/// lies within `tolerance` of it, averaged over the clusters, is gamma.
pub fn tune_gamma_cmd(spec: &JobSpec, options: &TuneGammaOptions) -> Result<TuneGammaReport> {
    if options.clusters == 0 || options.members == 0 {
        bail!("tune gamma needs at least one cluster and one member");
    }
    if !(options.max_ratio > 0.0 && options.max_ratio <= 1.0) {
        bail!("--max-ratio must be in (0, 1], got {}", options.max_ratio);
    }
    let started = Instant::now();
    let sample = sample_clusters(spec, Some(options.clusters), options.members, GAMMA_STREAM)?;
    let mut scorer = build_scorer(spec)?;
    let steps = ((options.max_ratio * 100.0).round() as usize).max(1);
    let ratios: Vec<f64> = (1..=steps).map(|k| k as f64 / 100.0).collect();
    let mut scored = 0;
    let tuning = tune_gamma(
        spec.seed,
        &sample.clusters,
        &ratios,
        options.tolerance,
        |members| {
            scored += members.len();
            tracing::info!(documents = members.len(), "tune gamma: scoring a cluster");
            score_members(&mut scorer, &sample, members)
        },
    )?;
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| spec.sink.path.join("tune"));
    let report = TuneGammaReport {
        tuning,
        clusters: sample.clusters.len(),
        documents_scored: scored,
        seconds: started.elapsed().as_secs_f64(),
        svg: out.join("tune-gamma.svg"),
    };
    crate::plot::write_chart_and_report(&out, "tune-gamma", &report.tuning.svg(), &report)?;
    Ok(report)
}

/// Options of `quad tune tau`.
#[derive(Debug, Clone)]
pub struct TuneTauOptions {
    /// Members scored per cluster (every cluster).
    pub per_cluster: usize,
    /// Equal-count buckets of the scores; their lower edges are the candidates.
    pub buckets: usize,
    /// Training steps of the proxy on each candidate's selection.
    pub steps: usize,
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TauRow {
    pub tau: f64,
    /// Sampled documents with influence >= tau.
    pub selected: usize,
    /// Reference loss of the proxy after `steps` steps on them.
    pub reference_loss: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneTauReport {
    pub documents_scored: usize,
    /// Reference loss of the proxy before any training.
    pub baseline_loss: f64,
    pub steps: usize,
    pub rows: Vec<TauRow>,
    /// The candidate with the lowest reference loss (ties: the larger selection).
    pub tau: f64,
    pub seconds: f64,
    pub svg: PathBuf,
}

impl std::fmt::Display for TuneTauReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "tune tau: {} documents scored; reference loss {:.4} before, {} steps on each selection ({:.1} s)",
            self.documents_scored, self.baseline_loss, self.steps, self.seconds
        )?;
        writeln!(f, "tau           selected  reference loss")?;
        for r in &self.rows {
            let mark = if r.tau == self.tau { "  <- pick" } else { "" };
            writeln!(
                f,
                "{:<13.6e} {:<9} {:.4}{mark}",
                r.tau, r.selected, r.reference_loss
            )?;
        }
        writeln!(f, "tau = {:e}", self.tau)?;
        write!(f, "plot: {}", self.svg.display())
    }
}

impl TuneTauReport {
    pub fn svg(&self, title: &str) -> String {
        let pts: Vec<(f64, f64)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i as f64, r.reference_loss))
            .collect();
        let pick = self.rows.iter().position(|r| r.tau == self.tau);
        let label = format!("tau = {:.3e}", self.tau);
        let markers: Vec<(f64, &str)> = pick
            .map(|i| (i as f64, label.as_str()))
            .into_iter()
            .collect();
        crate::plot::line_chart(
            title,
            "candidate (bucket lower edge, ascending tau)",
            "reference loss after training on the selection",
            &[("reference loss", pts)],
            &markers,
        )
    }
}

/// `quad tune tau`: scores `per_cluster` seeded members of every cluster, cuts the scores into
/// `buckets` equal-count buckets whose lower edges are the candidates, and for each candidate
/// trains a fresh copy of the proxy (`influence.model`) for `steps` steps (the `[warmup]`
/// optimiser at its final rate) on the sampled documents it selects, then measures the reference loss.
/// The candidate with the lowest loss is the pick.
pub fn tune_tau_cmd(spec: &JobSpec, options: &TuneTauOptions) -> Result<TuneTauReport> {
    if options.per_cluster == 0 || options.buckets == 0 || options.steps == 0 {
        bail!("tune tau needs positive --per-cluster, --buckets and --steps");
    }
    let started = Instant::now();
    let sample = sample_clusters(spec, None, options.per_cluster, TAU_STREAM)?;
    let members: Vec<MemberRef> = sample
        .clusters
        .iter()
        .flat_map(|(_, ms)| ms.iter().copied())
        .collect();
    let mut scorer = build_scorer(spec)?;
    tracing::info!(documents = members.len(), "tune tau: scoring the sample");
    let scores = score_members(&mut scorer, &sample, &members)?;
    drop(scorer);
    let candidates = tau_candidates(&scores, options.buckets);
    if candidates.is_empty() {
        bail!("tune tau: no finite score in the sample");
    }

    let inf = &spec.influence;
    let mut reference: Vec<String> =
        crate::influence::setup::read_documents(&inf.reference, &spec.source)?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
    if let Some(n) = inf.reference_docs {
        reference.truncate(n);
    }
    let device = crate::influence::scorer::parse_device(&inf.device).map_err(anyhow::Error::msg)?;
    let load = || -> Result<CausalLm> {
        CausalLm::load(&inf.model, device, tch::Kind::Float)
            .with_context(|| format!("loading {}", inf.model.display()))
    };
    let warm = &spec.warmup;
    let window = warm.seq_len;
    let max_tokens = inf.max_tokens.unwrap_or(warm.doc_max_tokens);
    let baseline_loss = reference_loss(&load()?, &reference, window, max_tokens)?;
    // The proxy continues training: at the constant rate its warm-up ended with (a fresh
    // warm-up to the peak rate would mostly measure the jolt, not the data).
    let mut opts = warm.train_options(warm.seed.unwrap_or(spec.seed));
    opts.steps = options.steps;
    opts.lr *= opts.min_lr_ratio;
    opts.min_lr_ratio = 1.0;
    opts.warmup_steps = 0;

    let mut rows = Vec::new();
    for (i, &tau) in candidates.iter().enumerate() {
        let texts: Vec<String> = members
            .iter()
            .zip(&scores)
            .filter(|(_, &s)| s >= tau)
            .map(|(m, _)| sample.text(m).to_string())
            .collect();
        let mut lm = load()?;
        let separator = lm.eos_id;
        match train_texts(
            &mut lm,
            &texts,
            max_tokens,
            window,
            separator,
            &opts,
            |_| {},
        ) {
            Ok(_) => {}
            // The top buckets of a small sample may hold less than one training window.
            Err(WarmupError::Data(why)) => {
                tracing::warn!(tau, selected = texts.len(), %why, "tune tau: candidate skipped");
                continue;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "training on the {} documents of tau = {tau:e}",
                    texts.len()
                )))
            }
        }
        lm.vs.freeze();
        let loss = reference_loss(&lm, &reference, window, max_tokens)?;
        tracing::info!(
            candidate = i + 1,
            of = candidates.len(),
            tau,
            selected = texts.len(),
            loss = format!("{loss:.4}"),
            "tune tau"
        );
        rows.push(TauRow {
            tau,
            selected: texts.len(),
            reference_loss: loss,
        });
    }
    let best = rows
        .iter()
        .min_by(|a, b| {
            a.reference_loss
                .total_cmp(&b.reference_loss)
                .then(b.selected.cmp(&a.selected))
        })
        .map(|r| r.tau)
        .context("tune tau: every candidate selects less than one training window")?;
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| spec.sink.path.join("tune"));
    let report = TuneTauReport {
        documents_scored: members.len(),
        baseline_loss,
        steps: options.steps,
        rows,
        tau: best,
        seconds: started.elapsed().as_secs_f64(),
        svg: out.join("tune-tau.svg"),
    };
    let mut title = String::new();
    let _ = write!(title, "Reference loss by tau ({})", spec.name);
    crate::plot::write_chart_and_report(&out, "tune-tau", &report.svg(&title), &report)?;
    Ok(report)
}
