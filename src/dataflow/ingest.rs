//! The ingest operators' contexts: what each stage's operator takes of the job.
use std::path::PathBuf;
use std::sync::Arc;

use super::{fail_handle, failed_handle, Shared, STOP};
use crate::cluster::operator::AssignContext;
use crate::cluster::semdedup::SemDedupSettings;
use crate::config::JobSpec;
use crate::dsir::DsirWeights;
use crate::embed::operator::EmbedContext;
use crate::influence::setup::read_documents;
use crate::select::operator::AdmitContext;
use crate::sink::epoch_sink::EpochSinkContext;
use crate::state::{EpochCommit, StateStore};

/// The `dsir` strategy's weights: the ones the store kept, or fitted from the reference set
/// against the first `select.dsir_pool_docs` documents of `shards` (in path order) and kept.
pub(super) fn dsir_weights(
    spec: &JobSpec,
    store: &StateStore,
    shards: &[PathBuf],
) -> anyhow::Result<DsirWeights> {
    if let Some(stored) = store.run_value::<serde_json::Value>(crate::dsir::STORE_KEY)? {
        tracing::info!("DSIR weights from the state store");
        return DsirWeights::from_stored(stored).map_err(anyhow::Error::msg);
    }
    let reference = read_documents(&spec.influence.reference, &spec.source)?;
    anyhow::ensure!(
        !reference.is_empty(),
        "select.strategy dsir: the reference set {} has no documents",
        spec.influence.reference.display()
    );
    let wanted = spec.select.dsir_pool_docs;
    let mut pool: Vec<String> = Vec::new();
    for shard in shards {
        if pool.len() >= wanted {
            break;
        }
        // A shard the job would quarantine is left out of the fit, not fatal.
        match read_documents(shard, &spec.source) {
            Ok(docs) => pool.extend(docs.into_iter().map(|(_, t)| t).take(wanted - pool.len())),
            Err(e) => tracing::warn!(error = %e, "DSIR pool: shard skipped"),
        }
    }
    let weights = DsirWeights::fit(
        reference.iter().map(|(_, t)| t.as_str()),
        pool.iter().map(String::as_str),
    );
    store.put_run_value(crate::dsir::STORE_KEY, &weights.to_stored())?;
    tracing::info!(
        reference = reference.len(),
        pool = pool.len(),
        "DSIR weights fitted and stored"
    );
    Ok(weights)
}

pub(super) fn admit_context(shared: &Arc<Shared>) -> AdmitContext {
    let spec = &shared.spec;
    AdmitContext {
        seed: spec.seed,
        select: spec.select.clone(),
        dedup: spec.dedup.clone(),
        store: shared.store.clone(),
        dedup_filter_bytes: (spec.runtime.dedup_filter_mib << 20) as usize,
        records_decisions: shared.place.count > 1,
        stop: &STOP,
        fail: fail_handle(shared),
    }
}

pub(super) fn embed_context(shared: &Arc<Shared>) -> EmbedContext {
    let spec = &shared.spec;
    EmbedContext {
        embed: spec.embed.clone(),
        text_column: spec.source.text_column.clone(),
        dim: shared.clustering.unwrap_or(0),
        cost: shared.embed_cost.clone(),
        fail: fail_handle(shared),
    }
}

pub(super) fn assign_context(shared: &Arc<Shared>, fit_epoch: Option<u64>) -> AssignContext {
    let spec = &shared.spec;
    AssignContext {
        store: shared.store.clone(),
        cluster: spec.cluster.clone(),
        seed: spec.seed,
        dim: shared.clustering.unwrap_or(0),
        fit_epoch,
        // Records behind the last `max_epochs_in_flight` epochs are never read again: a
        // worker sends an epoch only once those before them committed everywhere.
        record_states: (shared.place.count > 1).then(|| spec.runtime.max_epochs_in_flight + 2),
        semdedup: (spec.select.strategy == crate::config::Strategy::Semdedup).then_some(
            SemDedupSettings {
                seed: spec.seed,
                epsilon: spec.select.semdedup_epsilon,
                ratio: spec.select.ratio,
                max_tokens: spec.select.max_tokens,
            },
        ),
        fail: fail_handle(shared),
    }
}

pub(super) fn epoch_sink_context(shared: &Arc<Shared>) -> EpochSinkContext {
    let spec = &shared.spec;
    let commit_shared = shared.clone();
    EpochSinkContext {
        store: shared.store.clone(),
        seed: spec.seed,
        sink: spec.sink.clone(),
        id_column: spec.source.id_column.clone(),
        text_column: spec.source.text_column.clone(),
        strategy: spec.select.strategy,
        fit_pool_docs: spec.influence.fit_pool_docs,
        clustering: shared.clustering.is_some(),
        order: shared.order.clone(),
        delay: shared.hooks.delay,
        crash_after_rename: shared.hooks.crash_after_rename,
        on_commit: Arc::new(move |commit| epoch_committed(&commit_shared, commit)),
        fail: fail_handle(shared),
        failed: failed_handle(shared),
    }
}

/// A committed epoch in the summary, the metrics, the status file and the progress.
fn epoch_committed(shared: &Shared, commit: &EpochCommit) {
    let (epoch, record) = (commit.epoch, &commit.record);
    let clustered = commit
        .clusters
        .as_ref()
        .map_or(0, |c| c.members.len() as u64);
    let shard_name = &record.shard;
    let mut summary = shared.summary.lock().expect("summary lock");
    summary.add_epoch(record);
    summary.clustered += clustered;
    drop(summary);
    super::monitor::epoch_committed(shared, commit);
    shared
        .progress
        .epoch_done(epoch, shard_name, record.docs, record.selected);
}
