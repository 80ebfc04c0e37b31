//! The Quad loop's side of the job: its context on a worker, the bandit as the store left it,
//! and the run's costs.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::{Shared, STOP};
use crate::bandit::{Bandit, ClusterChange, RoundOutcome};
use crate::cost::Costs;
use crate::quad_loop::{DocScorer, LoopContext, ScorerFactory, ShardPaths, TalliedScorer};

/// The Quad loop's context on this worker: the store, the scorer factory (worker 0 builds the
/// model once, at the first round that scores), and the callbacks for progress and summary.
pub(super) fn loop_context(shared: &Arc<Shared>, watch: bool) -> Arc<LoopContext> {
    let spec = &shared.spec;
    let scorer_shared = shared.clone();
    let scorer: ScorerFactory = Arc::new(move || {
        let spec = &scorer_shared.spec;
        let pool = crate::quad_loop::stored_fit_pool(
            &scorer_shared.store,
            &spec.source,
            spec.influence.fit_pool_docs,
        )?;
        let scorer =
            crate::influence::setup::build_scorer(&spec.influence, &spec.source, pool, spec.seed)?;
        Ok(Box::new(TalliedScorer::new(
            scorer,
            scorer_shared.score_tally.clone(),
            spec.influence.window as u64,
        )) as Box<dyn DocScorer>)
    });
    let round_shared = shared.clone();
    let on_round = Arc::new(move |outcome: &RoundOutcome| {
        let selected_tokens: u64 = outcome.selected.iter().map(|(m, _)| m.tokens).sum();
        tracing::info!(
            round = outcome.round,
            scored = outcome.scored.len(),
            selected = outcome.selected.len(),
            total_selected_tokens = outcome.selected_tokens,
            "bandit round committed"
        );
        round_shared
            .round_times
            .lock()
            .expect("round times")
            .record(Instant::now());
        let mut summary = round_shared.summary.lock().expect("summary lock");
        summary.rounds = Some(summary.rounds.unwrap_or(0) + 1);
        summary.scored += outcome.scored.len() as u64;
        summary.selected += outcome.selected.len() as u64;
        summary.selected_tokens += selected_tokens;
    });
    let file_shared = shared.clone();
    let on_file = Arc::new(move |_name: &str, _rows: usize| {
        file_shared
            .summary
            .lock()
            .expect("summary lock")
            .files_written += 1;
    });
    let fail_shared = shared.clone();
    let failed_shared = shared.clone();
    Arc::new(LoopContext {
        store: shared.store.clone(),
        seed: spec.seed,
        source: spec.source.clone(),
        sink: spec.sink.clone(),
        shards: ShardPaths::new(shared.store.clone()),
        scorer,
        watch,
        on_round,
        on_file,
        stop: &STOP,
        fail: Arc::new(move |e| fail_shared.fail(e)),
        failed: Arc::new(move || failed_shared.failed.load(Ordering::SeqCst)),
        crash_after_round: shared.hooks.crash_after_round,
    })
}

/// The bandit where the last committed round left it (or new), with every cluster's
/// aggregates as the store holds them now (epochs committed after the last round included).
pub(super) fn load_bandit(shared: &Shared) -> Result<Bandit> {
    let spec = &shared.spec;
    let mut bandit = match shared.store.bandit()? {
        Some(b) => b,
        None => Bandit::new(spec.seed, spec.select.strategy, spec.bandit.clone())?,
    };
    let clusters: Vec<ClusterChange> = shared
        .store
        .clusters()?
        .into_iter()
        .map(|info| info.as_change())
        .collect();
    bandit.reset_aggregates(&clusters)?;
    Ok(bandit)
}

/// Adds this run's embedding and scoring costs to the stored ones and returns the total.
pub(super) fn record_costs(shared: &Shared) -> Result<Costs> {
    let spec = &shared.spec;
    let mut costs: Costs = shared
        .store
        .run_value(crate::report::COSTS_KEY)?
        .unwrap_or_default();
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
        run.score_flops =
            crate::cost::score_flops(shape, blocks, windows, spec.influence.normalise);
        // The factors are fitted once per model and data (then cached): counted at most
        // once, when no earlier run of this job counted them, with full windows (an upper
        // bound: the fit documents' lengths are not kept).
        if costs.factor_flops == 0.0
            && spec.influence.preconditioner != crate::influence::Preconditioner::Identity
        {
            let fit_docs =
                spec.influence.reference_docs.unwrap_or(0) + spec.influence.fit_pool_docs;
            run.factor_flops =
                crate::cost::factor_fit_flops(shape, blocks, std::iter::repeat_n(window, fit_docs));
        }
    }
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
