//! What a running job shows outside its log: the Prometheus metrics (`crate::metrics`) and the
//! status file (`crate::status`), both updated where the summary is, in O(1) a commit (O(rejects)
//! of the epoch for the rejects by kind).
use std::sync::{Arc, Weak};

use super::Shared;
use crate::bandit::RoundOutcome;
use crate::cost::Costs;
use crate::metrics::{Metrics, Refresh};
use crate::state::EpochCommit;

/// A committed epoch in the metrics and the status file.
pub(super) fn epoch_committed(shared: &Shared, commit: &EpochCommit) {
    let (m, record) = (&shared.metrics, &commit.record);
    if let Some(clusters) = &commit.clusters {
        m.clusters_seen(clusters.clusters.iter().map(|c| c.cluster));
    }
    // The status file first: a scraper that sees the commit finds it in `quad status` too.
    publish_status(shared, true);
    match record.quarantined {
        Some(_) => m.shards_quarantined.inc(),
        None => m.shards_done.inc(),
    }
    m.epochs_committed.inc();
    m.epochs_in_flight.dec();
    m.rows_read.inc_by(record.rows);
    m.documents.inc_by(record.docs);
    m.duplicates.inc_by(record.duplicates);
    for reject in &commit.rejects {
        m.reject(&reject.kind());
    }
    m.selected_documents.inc_by(record.selected);
    m.selected_tokens.inc_by(record.selected_tokens);
    m.committed();
}

/// A committed round in the metrics and the status file.
pub(super) fn round_committed(shared: &Shared, outcome: &RoundOutcome, selected_tokens: u64) {
    publish_status(shared, true);
    let m = &shared.metrics;
    m.rounds.inc();
    m.scored_documents.inc_by(outcome.scored.len() as u64);
    m.scored_tokens
        .inc_by(outcome.scored.iter().map(|(member, _)| member.tokens).sum());
    m.selected_documents.inc_by(outcome.selected.len() as u64);
    m.selected_tokens.inc_by(selected_tokens);
    m.committed();
}

/// Replaces the status file with the job's status now; a failure is logged, never fatal.
pub(super) fn publish_status(shared: &Shared, running: bool) {
    let summary = shared.summary.lock().expect("summary lock").clone();
    let clusters = shared
        .clustering
        .map(|_| shared.metrics.clusters.get() as u64);
    let status = shared.status.status(&summary, clusters, running);
    if let Err(e) = shared.status.publish(&status) {
        tracing::warn!("cannot write the status file: {e}");
    }
}

/// What a scrape reads rather than counts: the store's size, this run's FLOPs by stage and the
/// scoring rate. Holds the job's state weakly, so that a scrape never keeps it alive.
pub(super) fn refresh(shared: Weak<Shared>) -> Refresh {
    Box::new(move |m: &Metrics| {
        if let Some(shared) = shared.upgrade() {
            refresh_now(&shared, m);
        }
    })
}

fn refresh_now(shared: &Arc<Shared>, m: &Metrics) {
    if let Ok(meta) = std::fs::metadata(shared.spec.state_path()) {
        m.state_store_bytes.set(meta.len() as i64);
    }
    let stored: Costs = shared
        .store
        .run_value(crate::report::COSTS_KEY)
        .ok()
        .flatten()
        .unwrap_or_default();
    let run = super::rounds::run_costs(shared, stored.factor_flops == 0.0);
    Metrics::raise_to(&m.flops.with_label_values(&["embed"]), run.embed_flops);
    Metrics::raise_to(&m.flops.with_label_values(&["factor"]), run.factor_flops);
    Metrics::raise_to(&m.flops.with_label_values(&["score"]), run.score_flops);
    let tally = shared.score_tally.lock().expect("score tally");
    if tally.busy_seconds > 0.0 {
        m.scoring_documents_per_second
            .set(tally.docs as f64 / tally.busy_seconds);
    }
}
