//! The Quad loop's side of the job: its operators' contexts on a worker, the bandit as the
//! store left it, and the run's costs.
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::{fail_handle, failed_handle, Shared, STOP};
use crate::bandit::operator::BanditContext;
use crate::bandit::{Bandit, RoundOutcome};
use crate::config::Strategy;
use crate::cost::Costs;
use crate::influence::loss::LossScorer;
use crate::influence::operator::{DocScorer, ScoreContext, ScorerFactory, TalliedScorer};
use crate::influence::setup::fit_pool_of;
use crate::membership::operator::MembershipContext;
use crate::membership::ShardPaths;
use crate::sink::round_sink::RoundSinkContext;

use super::quad_loop::LoopContext;

/// The Quad loop's contexts on this worker: one for each stage's operator, the membership and
/// the round sink sharing one lookup of shard paths. `holds_store`: this is the process's first
/// worker, which answers for the process's store in the draws.
pub(super) fn loop_context(shared: &Arc<Shared>, watch: bool, holds_store: bool) -> LoopContext {
    let shards = Arc::new(ShardPaths::new(shared.store.clone()));
    LoopContext {
        bandit: bandit_context(shared, watch),
        membership: membership_context(shared, shards.clone(), holds_store),
        score: score_context(shared),
        round_sink: round_sink_context(shared, shards, holds_store),
    }
}

/// The bandit operator's context: round decisions committed to the store, the last one to
/// replay, and the callback for progress and summary.
fn bandit_context(shared: &Arc<Shared>, watch: bool) -> BanditContext {
    let store = shared.store.clone();
    let round_shared = shared.clone();
    let replay = shared.store.last_outcome().unwrap_or_else(|e| {
        shared.fail(e.into());
        None
    });
    BanditContext {
        commit_decision: Arc::new(move |record, bandit, outcome| {
            Ok(store.commit_decision(record, bandit, outcome)?)
        }),
        replay,
        on_round: Arc::new(move |outcome: &RoundOutcome| round_committed(&round_shared, outcome)),
        watch,
        stop: &STOP,
        fail: fail_handle(shared),
        failed: failed_handle(shared),
    }
}

/// A committed round in the log, the round times and the summary.
fn round_committed(shared: &Shared, outcome: &RoundOutcome) {
    let selected_tokens: u64 = outcome.selected.iter().map(|(m, _)| m.tokens).sum();
    tracing::info!(
        round = outcome.round,
        scored = outcome.scored.len(),
        selected = outcome.selected.len(),
        total_selected_tokens = outcome.selected_tokens,
        "bandit round committed"
    );
    shared
        .round_times
        .lock()
        .expect("round times")
        .record(Instant::now());
    let mut summary = shared.summary.lock().expect("summary lock");
    summary.rounds = Some(summary.rounds.unwrap_or(0) + 1);
    summary.scored += outcome.scored.len() as u64;
    summary.selected += outcome.selected.len() as u64;
    summary.selected_tokens += selected_tokens;
    drop(summary);
    super::monitor::round_committed(shared, outcome, selected_tokens);
}

/// The membership operator's context; `shards` is the loop's one lookup of shard paths.
fn membership_context(
    shared: &Arc<Shared>,
    shards: Arc<ShardPaths>,
    holds_store: bool,
) -> MembershipContext {
    MembershipContext {
        store: shared.store.clone(),
        seed: shared.spec.seed,
        source: shared.spec.source.clone(),
        shards,
        fit_pool_docs: shared.spec.influence.fit_pool_docs,
        holds_store,
        fail: fail_handle(shared),
    }
}

/// The score operator's context: the scorer factory (each process's first worker builds the
/// model once, on the process's device, at the first round it scores, fitted on the pool's
/// sample that every store sent).
fn score_context(shared: &Arc<Shared>) -> ScoreContext {
    let scorer_shared = shared.clone();
    let scorer: ScorerFactory = Arc::new(move |sample| {
        let spec = &scorer_shared.spec;
        if spec.select.strategy == Strategy::Perplexity {
            let scorer = LossScorer::load(&spec.influence)?;
            return Ok(
                Box::new(scorer.with_tally(scorer_shared.score_tally.clone()))
                    as Box<dyn DocScorer>,
            );
        }
        let pool = fit_pool_of(&scorer_shared.store, &spec.source, sample);
        let scorer =
            crate::influence::setup::build_scorer(&spec.influence, &spec.source, pool, spec.seed)?;
        Ok(Box::new(TalliedScorer::new(
            scorer,
            scorer_shared.score_tally.clone(),
            spec.influence.window as u64,
        )) as Box<dyn DocScorer>)
    });
    ScoreContext {
        scorer,
        fit_pool_docs: shared.spec.influence.fit_pool_docs,
        processes: shared.place.count as u64,
        workers: shared.place.workers as u64,
        fail: fail_handle(shared),
    }
}

/// The round sink's context on this worker: the store, the loop's shard paths, and the
/// callback for the summary.
fn round_sink_context(
    shared: &Arc<Shared>,
    shards: Arc<ShardPaths>,
    holds_store: bool,
) -> RoundSinkContext {
    let spec = &shared.spec;
    let file_shared = shared.clone();
    let on_file = Arc::new(move |_name: &str, _rows: usize| {
        file_shared
            .summary
            .lock()
            .expect("summary lock")
            .files_written += 1;
    });
    RoundSinkContext {
        store: shared.store.clone(),
        seed: spec.seed,
        holds_store,
        every_member_here: shared.place.count == 1,
        source: spec.source.clone(),
        sink: spec.sink.clone(),
        shards,
        on_file,
        fail: fail_handle(shared),
        failed: failed_handle(shared),
        crash_after_round: shared.hooks.crash_after_round,
    }
}

/// The bandit where the last committed round left it (or new), its clusters' aggregates
/// emptied: they come in the dataflow, starting from every store's share (epochs committed
/// after the last round included).
pub(super) fn load_bandit(shared: &Shared) -> Result<Bandit> {
    let spec = &shared.spec;
    let mut bandit = match shared.store.bandit()? {
        Some(b) => b,
        None => Bandit::new(spec.seed, spec.select.strategy, spec.bandit.clone())?
            .with_band(spec.select.perplexity_band),
    };
    // The aggregates come in the dataflow: every store's share at time 0 (`stored_shares`),
    // then what this run's epochs and rounds change.
    bandit.reset_aggregates(&[])?;
    Ok(bandit)
}

/// Adds this run's embedding and scoring costs to the stored ones and returns the total.
pub(super) fn record_costs(shared: &Shared) -> Result<Costs> {
    let mut costs: Costs = shared
        .store
        .run_value(crate::report::COSTS_KEY)?
        .unwrap_or_default();
    let run = run_costs(shared, costs.factor_flops == 0.0);
    costs.add(&run);
    let clusters = shared.store.clusters()?;
    costs.pool_docs = clusters.iter().map(|c| c.size).sum();
    costs.pool_tokens = clusters.iter().map(|c| c.tokens).sum();
    shared
        .store
        .put_run_value(crate::report::COSTS_KEY, &costs)?;
    let mix = crate::report::update_pool_tokens_by_source(&shared.store)?;
    shared
        .store
        .put_run_value(crate::report::POOL_MIX_KEY, &mix)?;
    Ok(costs)
}

/// This run's embedding, factor-fitting and scoring costs so far; the factors count only when
/// `count_factors` (no earlier run of the job counted them).
pub(super) fn run_costs(shared: &Shared, count_factors: bool) -> Costs {
    let spec = &shared.spec;
    let (embed_flops, embedded) = *shared.embed_cost.lock().expect("embed cost");
    let tally = shared.score_tally.lock().expect("score tally").clone();
    let mut run = Costs {
        embed_flops,
        docs_embedded: embedded,
        docs_scored: tally.docs,
        tokens_scored: tally.tokens,
        ..Default::default()
    };
    if let Some((shape, blocks)) = &tally.shape {
        let window = spec.influence.window as u64;
        let windows = tally
            .windows
            .iter()
            .flat_map(|(&len, &count)| std::iter::repeat_n(len, count as usize));
        if tally.forward_only {
            // `perplexity`: one forward pass a window, no factors.
            run.score_flops = windows.map(|t| shape.forward_flops(t)).sum();
            return run;
        }
        run.score_flops =
            crate::cost::score_flops(shape, blocks, windows, spec.influence.normalise);
        // The factors are fitted once per model and data (then cached): counted at most
        // once, when no earlier run of this job counted them, with full windows (an upper
        // bound: the fit documents' lengths are not kept).
        if count_factors
            && spec.influence.preconditioner != crate::influence::Preconditioner::Identity
        {
            let fit_docs =
                spec.influence.reference_docs.unwrap_or(0) + spec.influence.fit_pool_docs;
            run.factor_flops =
                crate::cost::factor_fit_flops(shape, blocks, std::iter::repeat_n(window, fit_docs));
        }
    }
    run
}
