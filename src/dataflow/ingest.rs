//! The ingest operators' contexts: what each stage's operator takes of the job.
use std::sync::Arc;

use super::{fail_handle, Shared, STOP};
use crate::cluster::operator::AssignContext;
use crate::embed::operator::EmbedContext;
use crate::select::operator::AdmitContext;

pub(super) fn admit_context(shared: &Arc<Shared>) -> AdmitContext {
    let spec = &shared.spec;
    AdmitContext {
        seed: spec.seed,
        select: spec.select.clone(),
        store: shared.store.clone(),
        dedup_filter_bytes: (spec.runtime.dedup_filter_mib << 20) as usize,
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
        fail: fail_handle(shared),
    }
}
