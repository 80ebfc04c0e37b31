//! The influence stage in the Quad loop, the score operator: each round's drawn samples scored
//! by the influence model of the cluster's process (the first worker of process
//! `cluster % processes`, on that process's GPU), each cluster's sample batched on its own in
//! member order (so batches, and hence floating-point results, do not depend on how many
//! processes score), the scores sent into the feedback edge; and what scoring cost.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::InfluenceScorer;
use crate::bandit::operator::Scored;
use crate::bandit::{DocLoc, MemberRef, Pull};
use crate::error::Fail;
use crate::membership::operator::Fetched;
use crate::progress::Durations;

/// Scores documents by their texts; the influence scorer implements it. A document that cannot
/// be scored (too short to predict a token, a score that is not finite) gets the reason.
pub trait DocScorer {
    /// Scores groups of texts, each group batched on its own (a group is one cluster's sample),
    /// in one call: one call a round.
    fn score(&mut self, groups: &[Vec<&str>]) -> Result<Vec<Vec<Result<f64, String>>>>;
}

/// Builds the scorer on the worker that scores (models are not shared across threads), fitted
/// on the pool's documents at the given locations (the first of the pool's sample by priority).
pub type ScorerFactory =
    Arc<dyn Fn(Vec<(u64, DocLoc)>) -> Result<Box<dyn DocScorer>> + Send + Sync>;

/// What the score operator needs of the job.
pub struct ScoreContext {
    pub scorer: ScorerFactory,
    /// `influence.fit_pool_docs`: how many of the pool's sample the scorer is fitted on.
    pub fit_pool_docs: usize,
    /// The job's processes: each process's first worker scores the clusters
    /// `cluster % processes` names it for.
    pub processes: u64,
    /// Workers a process.
    pub workers: u64,
    pub fail: Fail,
}

/// Scores each round's drawn samples on the first worker of the cluster's process (that
/// process's model), in a fixed order, and sends the pulls with their scores into the feedback
/// edge. Every scorer gets every tick (each round's, and the pool's sample to fit on), so each
/// answers every round, with what it scored or nothing.
pub fn score_operator<'scope>(
    fetched: StreamVec<'scope, u64, Fetched>,
    ctx: ScoreContext,
) -> StreamVec<'scope, u64, Scored> {
    let (processes, workers) = (ctx.processes.max(1), ctx.workers);
    let route = move |msg: Fetched| -> Vec<(u64, Fetched)> {
        match &msg {
            Fetched::Drawn { pull, .. } => {
                vec![(u64::from(pull.cluster) % processes * workers, msg)]
            }
            Fetched::Tick { .. } => (0..processes).map(|p| (p * workers, msg.clone())).collect(),
        }
    };
    fetched
        .flat_map(route)
        .unary_frontier::<CapacityContainerBuilder<Vec<Scored>>, _, _, _>(
            Exchange::new(|(to, _): &(u64, Fetched)| *to),
            "Score",
            move |_capability, _info| {
                let mut scorer: Option<Box<dyn DocScorer>> = None;
                // The pool's sample for fitting, merged from every store's (each process keeps the
                // sample of the shards it read): the first `fit_pool_docs` by priority over all.
                let mut fit_sample: BTreeSet<(u64, DocLoc)> = BTreeSet::new();
                let mut stash: BTreeMap<u64, (Capability<u64>, Vec<DrawnTexts>)> = BTreeMap::new();
                move |(input, frontier), output| {
                    input.for_each_stamp(|cap, data| {
                        let Some(cap) = cap.retain_least(output.output_index()) else {
                            return;
                        };
                        let entry = stash
                            .entry(*cap.time())
                            .or_insert_with(|| (cap.clone(), Vec::new()));
                        for container in data {
                            for (_, msg) in container.drain(..) {
                                match msg {
                                    Fetched::Drawn { pull, texts, .. } => {
                                        entry.1.push((pull, texts))
                                    }
                                    Fetched::Tick {
                                        fit_sample: part, ..
                                    } => {
                                        fit_sample.extend(part);
                                        while fit_sample.len() > ctx.fit_pool_docs {
                                            fit_sample.pop_last();
                                        }
                                    }
                                }
                            }
                        }
                    });
                    while let Some((&time, _)) = stash.first_key_value() {
                        if frontier.less_equal(&time) {
                            break;
                        }
                        let (cap, mut drawn) = stash.remove(&time).expect("first key");
                        drawn.sort_by_key(|(pull, _)| pull.cluster);
                        match score_round(&ctx, &mut scorer, &fit_sample, &drawn) {
                            Ok((scores, unscorable)) => output.session(&cap).give(Scored {
                                pulls: drawn.into_iter().map(|(pull, _)| pull).collect(),
                                scores,
                                unscorable,
                            }),
                            Err(e) => (ctx.fail)(e),
                        }
                    }
                }
            },
        )
}

/// A drawn pull with the texts of its members (or why a text is missing).
type DrawnTexts = (Pull, Vec<Result<String, String>>);

/// The scores of a round's scored members, each pull's members scored as one group in member
/// order (the same batches whatever the number of workers and processes); a member that cannot
/// be scored gets NaN, and its reason.
#[allow(clippy::type_complexity)]
fn score_round(
    ctx: &ScoreContext,
    scorer: &mut Option<Box<dyn DocScorer>>,
    fit_sample: &BTreeSet<(u64, DocLoc)>,
    drawn: &[DrawnTexts],
) -> Result<(Vec<(MemberRef, f64)>, Vec<(MemberRef, String)>)> {
    let mut scores: Vec<(MemberRef, f64)> = Vec::new();
    let mut unscorable: Vec<(MemberRef, String)> = Vec::new();
    // Per pull: its readable members and their texts, in member order.
    let mut groups: Vec<Vec<(MemberRef, &str)>> = Vec::new();
    for (pull, texts) in drawn.iter().filter(|(pull, _)| pull.score) {
        let mut docs: Vec<(MemberRef, &Result<String, String>)> =
            pull.members.iter().copied().zip(texts.iter()).collect();
        docs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut readable = Vec::with_capacity(docs.len());
        for (m, text) in docs {
            match text {
                Ok(text) => readable.push((m, text.as_str())),
                Err(reason) => {
                    scores.push((m, f64::NAN));
                    unscorable.push((m, reason.clone()));
                }
            }
        }
        if !readable.is_empty() {
            groups.push(readable);
        }
    }
    if groups.is_empty() {
        return Ok((scores, unscorable));
    }
    if scorer.is_none() {
        let sample = fit_sample.iter().copied().collect();
        *scorer = Some((ctx.scorer)(sample).context("loading the influence scorer")?);
    }
    let scorer = scorer.as_mut().expect("just set");
    let texts: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(|(_, t)| *t).collect())
        .collect();
    let started = std::time::Instant::now();
    let values = scorer.score(&texts)?;
    tracing::debug!(
        documents = texts.iter().map(Vec::len).sum::<usize>(),
        groups = texts.len(),
        seconds = started.elapsed().as_secs_f64(),
        "scored"
    );
    anyhow::ensure!(
        values.len() == groups.len() && values.iter().zip(&groups).all(|(v, g)| v.len() == g.len()),
        "the scorer returned other counts of scores than of documents"
    );
    for ((m, _), value) in groups.iter().flatten().zip(values.into_iter().flatten()) {
        match value {
            Ok(v) => scores.push((*m, v)),
            Err(reason) => {
                scores.push((*m, f64::NAN));
                unscorable.push((*m, reason));
            }
        }
    }
    Ok((scores, unscorable))
}

/// What the influence operator spent, for the cost accounting (DESIGN 1.4): the model's shape
/// and the scored documents' token and window counts, O(1) whatever the pool.
#[derive(Debug, Clone, Default)]
pub struct ScoreTally {
    /// The model's shape and K-FAC blocks, once the scorer is built.
    pub shape: Option<(crate::cost::TransformerShape, Vec<crate::cost::Linear>)>,
    pub docs: u64,
    pub tokens: u64,
    /// Windows of each length scored (length -> count).
    pub windows: BTreeMap<u64, u64>,
    /// How long each call (one a round) took.
    pub seconds: Durations,
    /// All calls together.
    pub busy_seconds: f64,
    /// The scorer runs the model forward only (`perplexity`: no gradients, no factors).
    pub forward_only: bool,
}

impl ScoreTally {
    /// One scored document of `tokens` tokens, cut into windows of `window` tokens.
    pub fn count_document(&mut self, tokens: u64, window: u64) {
        let window = window.max(1);
        self.docs += 1;
        self.tokens += tokens;
        let full = tokens / window;
        if full > 0 {
            *self.windows.entry(window).or_default() += full;
        }
        if !tokens.is_multiple_of(window) {
            *self.windows.entry(tokens % window).or_default() += 1;
        }
    }
}

/// The influence scorer as the loop's `DocScorer`, counting what it scores.
pub struct TalliedScorer {
    pub scorer: InfluenceScorer,
    pub tally: Arc<Mutex<ScoreTally>>,
    pub window: u64,
}

impl TalliedScorer {
    pub fn new(
        scorer: InfluenceScorer,
        tally: Arc<Mutex<ScoreTally>>,
        window: u64,
    ) -> TalliedScorer {
        let shape = crate::cost::TransformerShape::llama(&scorer.model().config);
        tally.lock().expect("score tally").shape = Some(shape);
        TalliedScorer {
            scorer,
            tally,
            window,
        }
    }
}

impl DocScorer for TalliedScorer {
    fn score(&mut self, groups: &[Vec<&str>]) -> Result<Vec<Vec<Result<f64, String>>>> {
        let started = std::time::Instant::now();
        let scored = groups
            .iter()
            .map(|texts| self.scorer.score(texts))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tally = self.tally.lock().expect("score tally");
        let seconds = started.elapsed().as_secs_f64();
        tally.seconds.push(seconds);
        tally.busy_seconds += seconds;
        for s in scored.iter().flatten() {
            tally.count_document(s.tokens, self.window);
        }
        Ok(scored
            .into_iter()
            .map(|group| {
                group
                    .into_iter()
                    .map(|s| s.influence.map_err(|reason| reason.to_string()))
                    .collect()
            })
            .collect())
    }
}
