//! The Quad loop (DESIGN 1.2 and 2.1): bandit rounds are the timestamps of a timely dataflow
//! whose scores come back to the bandit through a feedback edge.
//!
//!   start ─▶ bandit (worker 0) ─▶ pulls ─▶ fetch (worker owning the cluster)
//!               ▲                                  │ texts
//!               └── scores (+1 round) ◀── score (worker 0: the process's influence model)
//!
//! Round t: the bandit plans its pulls (a pure function of its state, the seed and t) and
//! sends them, with a tick, at time t. The owners of the pulled clusters fetch the members'
//! texts from their shards by location; the scorer scores them in a fixed order (so batches,
//! and hence floating-point results, do not depend on the worker count) and sends the scores
//! into the feedback edge, where they arrive at t+1. When the bandit's frontier passes t+1 it
//! has every score of round t: it observes them, writes the selected rows as one Parquet file
//! and commits the file, the round record and its own state in one store transaction. Then it
//! plans round t+1 with the capability of the arriving scores, or drops it when it is done.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, ConnectLoop, Feedback, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

use crate::bandit::{Bandit, MemberRef, Pull, RoundOutcome};
use crate::config::{SinkConfig, SourceConfig};
use crate::schema;
use crate::sink;
use crate::source;

/// Scores documents by their texts; the influence scorer implements it.
pub trait DocScorer {
    fn score(&mut self, texts: &[&str]) -> Result<Vec<f64>>;
}

/// Builds the scorer on the worker that scores (models are not shared across threads).
pub type ScorerFactory = Arc<dyn Fn() -> Result<Box<dyn DocScorer>> + Send + Sync>;

/// What a round wrote: its output file (None when it selected nothing) and the selected
/// tokens by the rows' `source` column (empty when the shards have none).
#[derive(Debug, Clone, Default)]
pub struct WrittenRound {
    pub file: Option<String>,
    pub tokens_by_source: BTreeMap<String, u64>,
}

/// Commits a round: its pulls, its outcome, the bandit state after it and its output file, in
/// one store transaction (the caller knows the record format).
pub type RoundCommit =
    Arc<dyn Fn(&[Pull], &RoundOutcome, &Bandit, &WrittenRound) -> Result<()> + Send + Sync>;

/// What the loop needs besides the bandit.
pub struct LoopContext {
    pub commit: RoundCommit,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    /// Shard path of every epoch whose documents are cluster members.
    pub shards: BTreeMap<u64, PathBuf>,
    pub scorer: ScorerFactory,
    /// Called on worker 0 after each committed round (progress, summary).
    pub on_round: Arc<dyn Fn(&RoundOutcome) + Send + Sync>,
    /// Set when a stop was requested: finish the round in flight, then stop.
    pub stop: &'static std::sync::atomic::AtomicBool,
    /// Reports a failure on any worker; the bandit then neither observes nor plans again, so
    /// the loop drains and the job ends with the error (nothing half-observed is committed).
    pub fail: Arc<dyn Fn(anyhow::Error) + Send + Sync>,
    pub failed: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// A request travelling from the bandit to the fetchers and on to the scorer.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Request {
    /// Members of one cluster to fetch (and score when `score`).
    Pull {
        round: u64,
        cluster: u32,
        members: Vec<MemberRef>,
        score: bool,
    },
    /// Sent every round to worker 0, so the round goes on even when nothing is scored.
    Tick { round: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Fetched {
    Texts {
        round: u64,
        docs: Vec<(MemberRef, String)>,
    },
    Tick {
        round: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Scored {
    Scores {
        round: u64,
        scores: Vec<(MemberRef, f64)>,
    },
    Tick {
        round: u64,
    },
}

/// Stashes a stamp's messages under its capability (pagerank's pattern): what `items` draws
/// from each message joins its time's batch, which the operator releases once its frontiers
/// have passed that time. A tick still opens the time's entry, so an empty round is released.
fn stash_by_time<'a, M: 'a, T>(
    stash: &mut BTreeMap<u64, (Capability<u64>, Vec<T>)>,
    cap: Capability<u64>,
    containers: impl IntoIterator<Item = &'a mut Vec<M>>,
    items: impl Fn(M) -> Vec<T>,
) {
    let entry = stash
        .entry(*cap.time())
        .or_insert_with(|| (cap.clone(), Vec::new()));
    for container in containers {
        for msg in container.drain(..) {
            entry.1.extend(items(msg));
        }
    }
}

/// The state the bandit operator keeps between activations.
struct BanditSide {
    bandit: Bandit,
    ctx: Arc<LoopContext>,
}

/// Runs rounds until the bandit is done (budget, no arm left), a stop is requested or a worker
/// fails (reported through `ctx.fail`). Runs on every worker of the process; worker 0 holds
/// the bandit. Returns the final bandit state on worker 0 and None elsewhere.
pub fn run_rounds(
    worker: &mut timely::worker::Worker,
    bandit: Option<Bandit>,
    ctx: Arc<LoopContext>,
) -> Option<Bandit> {
    let index = worker.index();
    let peers = worker.peers() as u64;
    let start_round = bandit.as_ref().map(|b| b.next_round()).unwrap_or(0);
    let side = Rc::new(RefCell::new(bandit.map(|bandit| BanditSide {
        bandit,
        ctx: ctx.clone(),
    })));
    let mut start = InputHandleVec::<u64, u64>::new();
    let probe = ProbeHandle::new();

    worker.dataflow::<u64, _, _>(|scope| {
        let (handle, scores) = scope.feedback::<Vec<Scored>>(1);
        let bandit_side = side.clone();
        let requests = start
            .to_stream(scope)
            .binary_frontier::<_, CapacityContainerBuilder<Vec<Request>>, _, _, _, _>(
                scores,
                Exchange::new(|_: &u64| 0),
                Exchange::new(|_: &Scored| 0),
                "Bandit",
                move |_capability, _info| {
                    let mut stash: BTreeMap<u64, (Capability<u64>, Vec<(MemberRef, f64)>)> =
                        BTreeMap::new();
                    move |(starts, start_frontier), (scores, score_frontier), output| {
                        let mut side = bandit_side.borrow_mut();
                        let mut begin = Vec::new();
                        starts.for_each_stamp(|cap, data| {
                            if let Some(cap) = cap.retain_least(output.output_index()) {
                                for container in data {
                                    begin.extend(container.drain(..).map(|r| (cap.delayed(&r), r)));
                                }
                            }
                        });
                        scores.for_each_stamp(|cap, data| {
                            if let Some(cap) = cap.retain_least(output.output_index()) {
                                stash_by_time(&mut stash, cap, data, |msg| match msg {
                                    Scored::Scores { scores, .. } => scores,
                                    Scored::Tick { .. } => Vec::new(),
                                });
                            }
                        });
                        let Some(side) = side.as_mut() else {
                            return;
                        };
                        for (cap, round) in begin {
                            let requests = side.plan(round);
                            output.session(&cap).give_iterator(requests.into_iter());
                        }
                        // Scores of round t arrive at t+1; observe once all of them are in.
                        while let Some((&time, _)) = stash.first_key_value() {
                            if start_frontier.less_equal(&time) || score_frontier.less_equal(&time)
                            {
                                break;
                            }
                            let (cap, scores) = stash.remove(&time).expect("first key");
                            if (side.ctx.failed)() {
                                continue;
                            }
                            match side.observe(time - 1, scores) {
                                Ok(true) => {
                                    let requests = side.plan(time);
                                    output.session(&cap).give_iterator(requests.into_iter());
                                }
                                Ok(false) => {}
                                Err(e) => (side.ctx.fail)(e),
                            }
                        }
                    }
                },
            );

        let fetch_ctx = ctx.clone();
        let fetched = requests.unary::<CapacityContainerBuilder<Vec<Fetched>>, _, _, _>(
            Exchange::new(move |r: &Request| match r {
                Request::Pull { cluster, .. } => u64::from(*cluster) % peers,
                Request::Tick { .. } => 0,
            }),
            "Fetch",
            move |_capability, _info| {
                move |input, output| {
                    input.for_each_stamp(|cap, data| {
                        let Some(cap) = cap.retain_least(output.output_index()) else {
                            return;
                        };
                        let mut session = output.session(&cap);
                        for container in data {
                            for request in container.drain(..) {
                                match request {
                                    Request::Tick { round } => {
                                        session.give(Fetched::Tick { round })
                                    }
                                    Request::Pull {
                                        round,
                                        members,
                                        score: true,
                                        ..
                                    } => match fetch_texts(&fetch_ctx, &members) {
                                        Ok(docs) => session.give(Fetched::Texts { round, docs }),
                                        Err(e) => (fetch_ctx.fail)(e),
                                    },
                                    // Taken without scoring: nothing to fetch until the sink.
                                    Request::Pull { .. } => {}
                                }
                            }
                        }
                    });
                }
            },
        );

        let score_ctx = ctx.clone();
        fetched
            .unary_frontier::<CapacityContainerBuilder<Vec<Scored>>, _, _, _>(
                Exchange::new(|_: &Fetched| 0),
                "Score",
                move |_capability, _info| {
                    let mut scorer: Option<Box<dyn DocScorer>> = None;
                    let mut stash: BTreeMap<u64, (Capability<u64>, Vec<(MemberRef, String)>)> =
                        BTreeMap::new();
                    move |(input, frontier), output| {
                        input.for_each_stamp(|cap, data| {
                            if let Some(cap) = cap.retain_least(output.output_index()) {
                                stash_by_time(&mut stash, cap, data, |msg| match msg {
                                    Fetched::Texts { docs, .. } => docs,
                                    Fetched::Tick { .. } => Vec::new(),
                                });
                            }
                        });
                        while let Some((&time, _)) = stash.first_key_value() {
                            if frontier.less_equal(&time) {
                                break;
                            }
                            let (cap, mut docs) = stash.remove(&time).expect("first key");
                            // A fixed order: the same batches whatever the number of workers.
                            docs.sort_by(|a, b| a.0.cmp(&b.0));
                            let scores = if docs.is_empty() {
                                Ok(Vec::new())
                            } else {
                                score_docs(&score_ctx, &mut scorer, &docs)
                            };
                            let mut session = output.session(&cap);
                            match scores {
                                Ok(scores) => session.give(Scored::Scores {
                                    round: time,
                                    scores,
                                }),
                                Err(e) => (score_ctx.fail)(e),
                            }
                            session.give(Scored::Tick { round: time });
                        }
                    }
                },
            )
            .probe_with(&probe)
            .connect_loop(handle);
    });

    if index == 0 {
        start.advance_to(start_round);
        start.send(start_round);
    }
    drop(start);
    while !probe.done() {
        worker.step_or_park(Some(std::time::Duration::from_millis(1)));
    }
    let side = side.borrow_mut().take();
    side.map(|side| side.bandit)
}

impl BanditSide {
    /// Round `round`'s requests (its pulls and a tick); none once the loop is over.
    fn plan(&mut self, round: u64) -> Vec<Request> {
        if (self.ctx.failed)() || self.bandit.is_done() || self.ctx.stop.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let pulls = self.bandit.plan_round(round);
        if pulls.is_empty() {
            return Vec::new();
        }
        let mut requests: Vec<Request> = pulls
            .into_iter()
            .map(|pull| Request::Pull {
                round,
                cluster: pull.cluster,
                members: pull.members,
                score: pull.score,
            })
            .collect();
        requests.push(Request::Tick { round });
        requests
    }

    /// Observes round `round`, writes and commits its output. Ok(true) when the loop goes on.
    fn observe(&mut self, round: u64, scores: Vec<(MemberRef, f64)>) -> Result<bool> {
        let pulls = self.bandit.plan_round(round);
        let outcome = self
            .bandit
            .observe(round, &scores)
            .with_context(|| format!("bandit round {round}"))?;
        let written = write_round(&self.ctx, round, &outcome)?;
        (self.ctx.commit)(&pulls, &outcome, &self.bandit, &written)
            .with_context(|| format!("committing round {round}"))?;
        (self.ctx.on_round)(&outcome);
        Ok(!outcome.done)
    }
}

/// Members grouped by the shard holding them, rows ascending.
fn by_shard<'a, T>(
    items: impl Iterator<Item = (&'a MemberRef, T)>,
) -> BTreeMap<u64, Vec<(u64, T)>> {
    let mut out: BTreeMap<u64, Vec<(u64, T)>> = BTreeMap::new();
    for (m, value) in items {
        out.entry(m.loc.shard).or_default().push((m.loc.row, value));
    }
    for rows in out.values_mut() {
        rows.sort_by_key(|(row, _)| *row);
    }
    out
}

fn shard_path(ctx: &LoopContext, epoch: u64) -> Result<&PathBuf> {
    ctx.shards
        .get(&epoch)
        .with_context(|| format!("no shard is recorded for epoch {epoch}"))
}

/// The texts of members, read back from their shards by location (one read per shard, only
/// the row groups and rows needed).
fn fetch_texts(ctx: &LoopContext, members: &[MemberRef]) -> Result<Vec<(MemberRef, String)>> {
    let mut out = Vec::with_capacity(members.len());
    for (epoch, rows) in by_shard(members.iter().map(|m| (m, *m))) {
        let path = shard_path(ctx, epoch)?;
        let wanted: Vec<u64> = rows.iter().map(|(row, _)| *row).collect();
        let batch = source::fetch_rows(path, &ctx.source, &wanted)?;
        let column = column(&batch, &ctx.source.text_column, path)?;
        for (i, (row, member)) in rows.into_iter().enumerate() {
            let text = source::string_at(column, i).with_context(|| {
                format!(
                    "{}: row {row}, column '{}': text is null on fetch",
                    path.display(),
                    ctx.source.text_column
                )
            })?;
            out.push((member, text.to_string()));
        }
    }
    Ok(out)
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &std::path::Path) -> Result<&'a ArrayRef> {
    let index = batch
        .schema()
        .index_of(name)
        .with_context(|| format!("{}: column '{name}' is missing", path.display()))?;
    Ok(batch.column(index))
}

fn score_docs(
    ctx: &LoopContext,
    scorer: &mut Option<Box<dyn DocScorer>>,
    docs: &[(MemberRef, String)],
) -> Result<Vec<(MemberRef, f64)>> {
    if scorer.is_none() {
        *scorer = Some((ctx.scorer)().context("loading the influence scorer")?);
    }
    let scorer = scorer.as_mut().expect("just set");
    let texts: Vec<&str> = docs.iter().map(|(_, t)| t.as_str()).collect();
    let values = scorer.score(&texts)?;
    anyhow::ensure!(
        values.len() == docs.len(),
        "the scorer returned {} scores for {} documents",
        values.len(),
        docs.len()
    );
    Ok(docs.iter().map(|(m, _)| *m).zip(values).collect())
}

/// Writes a round's selected rows (fetched back by location) with quad_cluster,
/// quad_influence and quad_round as one Parquet file.
fn write_round(ctx: &LoopContext, round: u64, outcome: &RoundOutcome) -> Result<WrittenRound> {
    let mut written = WrittenRound::default();
    if outcome.selected.is_empty() {
        return Ok(written);
    }
    let mut batches = Vec::new();
    let mut out_schema = None;
    let selected = by_shard(
        outcome
            .selected
            .iter()
            .map(|(m, v)| (m, (m.cluster, *v, m.tokens))),
    );
    for (epoch, rows) in selected {
        let path = shard_path(ctx, epoch)?;
        let wanted: Vec<u64> = rows.iter().map(|(row, _)| *row).collect();
        let batch = source::fetch_rows(path, &ctx.source, &wanted)?;
        let schema = schema::output_schema(&batch.schema());
        match &out_schema {
            None => out_schema = Some(schema.clone()),
            Some(first) if first != &schema => anyhow::bail!(
                "{}: its columns differ from the other shards' ({:?}); one round's output needs one schema",
                path.display(),
                batch.schema().fields().iter().map(|f| f.name()).collect::<Vec<_>>()
            ),
            Some(_) => {}
        }
        let n = batch.num_rows();
        if let Ok(index) = batch.schema().index_of(SOURCE_COLUMN) {
            for (i, (_, (_, _, tokens))) in rows.iter().enumerate() {
                let domain = source::string_at(batch.column(index), i).unwrap_or("(none)");
                *written
                    .tokens_by_source
                    .entry(domain.to_string())
                    .or_default() += tokens;
            }
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for field in schema::output_fields() {
            let array: ArrayRef = match field.name().as_str() {
                "quad_cluster" => Arc::new(Int32Array::from_iter_values(
                    rows.iter().map(|(_, (c, _, _))| *c as i32),
                )),
                "quad_influence" => Arc::new(
                    rows.iter()
                        .map(|(_, (_, v, _))| *v)
                        .collect::<Float64Array>(),
                ),
                "quad_round" => Arc::new(Int64Array::from(vec![round as i64; n])),
                other => anyhow::bail!("internal: unknown output column {other}"),
            };
            debug_assert_eq!(array.len(), n);
            columns.push(array);
        }
        batches.push(RecordBatch::try_new(schema, columns)?);
    }
    let Some(out_schema) = out_schema else {
        return Ok(written);
    };
    let name = round_file_name(round);
    sink::write_durably(&ctx.sink.path, &name, out_schema, &batches, &ctx.sink)
        .with_context(|| format!("writing {}", ctx.sink.path.join(&name).display()))?;
    written.file = Some(name);
    Ok(written)
}

/// The column whose values the report's "selected tokens by source" plot groups by.
pub const SOURCE_COLUMN: &str = "source";

/// Output file of a bandit round (`part-` so that leftovers of an uncommitted round are
/// removed like those of an uncommitted epoch).
pub fn round_file_name(round: u64) -> String {
    format!("part-r{round:06}.parquet")
}

/// What the influence operator spent, for the cost accounting (DESIGN 1.4).
#[derive(Debug, Clone, Default)]
pub struct ScoreTally {
    /// The model's shape and K-FAC blocks, once the scorer is built.
    pub shape: Option<(crate::cost::TransformerShape, Vec<crate::cost::Linear>)>,
    /// Tokens of every scored document (as scored: truncated to `influence.max_tokens`).
    pub doc_tokens: Vec<u64>,
}

/// The influence scorer as the loop's `DocScorer`, counting what it scores.
pub struct TalliedScorer {
    pub scorer: crate::influence::InfluenceScorer,
    pub tally: Arc<std::sync::Mutex<ScoreTally>>,
}

impl TalliedScorer {
    pub fn new(
        scorer: crate::influence::InfluenceScorer,
        tally: Arc<std::sync::Mutex<ScoreTally>>,
    ) -> TalliedScorer {
        let shape = crate::cost::TransformerShape::llama(&scorer.model().config);
        tally.lock().expect("score tally").shape = Some(shape);
        TalliedScorer { scorer, tally }
    }
}

impl DocScorer for TalliedScorer {
    fn score(&mut self, texts: &[&str]) -> Result<Vec<f64>> {
        let scores = self.scorer.score(texts)?;
        let mut tally = self.tally.lock().expect("score tally");
        tally.doc_tokens.extend(scores.iter().map(|s| s.tokens));
        Ok(scores.into_iter().map(|s| s.influence).collect())
    }
}
