//! The assign operator: documents to clusters on worker 0, epoch by epoch in order.
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::assign::Assigner;
use super::semdedup::{SemDedup, SemDedupSettings, SemanticVerdicts};
use super::ClusterConfig;
use crate::embed::operator::EmbeddedEpoch;
use crate::error::Fail;
use crate::select::Verdicts;
use crate::state::{ClusterCommit, StateStore};

/// What the assign operator needs of the job.
pub struct AssignContext {
    /// Where the assign state of the last committed epoch is read from.
    pub store: Arc<StateStore>,
    pub cluster: ClusterConfig,
    pub seed: u64,
    /// The vectors' width.
    pub dim: usize,
    /// The epoch whose end forces the initial fit when fewer documents than the fit window
    /// came (the last shard of a run that is not long-lived).
    pub fit_epoch: Option<u64>,
    /// A job of several processes: the state after each epoch is recorded in the store
    /// (process 0's), where a restart finds the state before any epoch it reads again,
    /// whichever process committed the epochs in between; records of this many recent epochs
    /// are kept (`StateStore::record_assigned`).
    pub record_states: Option<u64>,
    /// The `semdedup` strategy's settings (None for other strategies).
    pub semdedup: Option<SemDedupSettings>,
    pub fail: Fail,
}

/// What the assign stage commits with an epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochClusters {
    pub epoch: u64,
    pub commit: ClusterCommit,
    /// `semdedup`'s decisions of the epoch.
    pub semantic: Option<SemanticVerdicts>,
}

/// Assigns documents to clusters on worker 0, epoch by epoch in order, once admit has decided
/// the epoch (its duplicates are not clustered) and its vectors are in.
pub fn assign_operator<'scope>(
    verdicts: StreamVec<'scope, u64, Verdicts>,
    embedded: StreamVec<'scope, u64, EmbeddedEpoch>,
    ctx: AssignContext,
) -> StreamVec<'scope, u64, EpochClusters> {
    verdicts.binary_frontier::<_, CapacityContainerBuilder<Vec<EpochClusters>>, _, _, _, _>(
        embedded,
        Pipeline,
        Exchange::new(|_: &EmbeddedEpoch| 0),
        "Assign",
        move |_capability, _info| {
            let dim = ctx.dim;
            // One process: the state after the store's last committed epoch, which is every
            // epoch before the first one read again (epochs commit in order).
            let stored = match ctx.record_states {
                None => ctx.store.clusterer_state(),
                Some(_) => Ok(None),
            };
            let mut assigner = match stored
                .map_err(anyhow::Error::from)
                .and_then(|bytes| Ok(Assigner::restore(bytes.as_deref(), dim)?))
            {
                Ok(assigner) => Some(assigner),
                Err(e) => {
                    (ctx.fail)(e);
                    None
                }
            };
            // Several processes: the epoch whose recorded state the assigner holds.
            let mut state_epoch: Option<u64> = None;
            let mut semdedup = match ctx
                .semdedup
                .clone()
                .map(|s| SemDedup::new(s, dim, ctx.store.clone(), ctx.record_states.is_some()))
            {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    (ctx.fail)(e.into());
                    None
                }
                None => None,
            };
            let mut decided: BTreeMap<u64, (Capability<u64>, Verdicts)> = BTreeMap::new();
            let mut vectors: BTreeMap<u64, EmbeddedEpoch> = BTreeMap::new();
            move |(verdict_input, verdict_frontier), (embedded_input, embedded_frontier), output| {
                verdict_input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        for container in data {
                            for v in container.drain(..) {
                                decided.insert(v.epoch, (cap.delayed(&v.epoch), v));
                            }
                        }
                    }
                });
                embedded_input.for_each_stamp(|_cap, data| {
                    for container in data {
                        for e in container.drain(..) {
                            vectors.insert(e.epoch, e);
                        }
                    }
                });
                loop {
                    let next = decided.keys().next().copied();
                    let next_vectors = vectors.keys().next().copied();
                    let Some(epoch) = next.into_iter().chain(next_vectors).min() else {
                        break;
                    };
                    if verdict_frontier.less_equal(&epoch) || embedded_frontier.less_equal(&epoch) {
                        break;
                    }
                    let embedded = vectors.remove(&epoch);
                    // An epoch admit did not decide (left for the next run) is not assigned.
                    let Some((cap, verdicts)) = decided.remove(&epoch) else {
                        continue;
                    };
                    let resumed =
                        continue_from_record(&ctx, epoch, &mut assigner, &mut state_epoch);
                    if let Err(e) = resumed {
                        (ctx.fail)(e.context(format!("clustering epoch {epoch}")));
                        continue;
                    }
                    let Some(assigner) = assigner.as_mut() else {
                        continue;
                    };
                    let Some(embedded) = embedded else {
                        (ctx.fail)(anyhow::anyhow!(
                            "internal: epoch {epoch} reached assign without its vectors"
                        ));
                        continue;
                    };
                    let duplicates: std::collections::HashSet<u64> =
                        verdicts.duplicates.iter().map(|d| d.row).collect();
                    let mut docs = Vec::with_capacity(embedded.docs.len());
                    let mut kept = Vec::with_capacity(embedded.vectors.len());
                    for (doc, vector) in embedded
                        .docs
                        .into_iter()
                        .zip(embedded.vectors.chunks(dim.max(1)))
                    {
                        if !duplicates.contains(&doc.row) {
                            docs.push(doc);
                            kept.extend_from_slice(vector);
                        }
                    }
                    let semantic = match semdedup
                        .as_mut()
                        .map(|s| s.decide_epoch(epoch, &docs, &kept))
                    {
                        Some(Ok(decided)) => Some(decided),
                        Some(Err(e)) => {
                            (ctx.fail)(e.into());
                            continue;
                        }
                        None => None,
                    };
                    let result = assigner.assign_epoch(
                        epoch,
                        &docs,
                        &kept,
                        &ctx.cluster,
                        ctx.seed,
                        ctx.fit_epoch == Some(epoch),
                    );
                    match result {
                        Ok(mut commit) => {
                            commit.seed = ctx.seed;
                            let recorded = record_state(&ctx, epoch, &commit, &mut state_epoch);
                            if let Err(e) = recorded {
                                (ctx.fail)(e);
                                continue;
                            }
                            let semantic = semantic.map(|(verdicts, added)| {
                                commit.semantic = added;
                                verdicts
                            });
                            output.session(&cap).give(EpochClusters {
                                epoch,
                                commit,
                                semantic,
                            })
                        }
                        Err(e) => (ctx.fail)(
                            anyhow::Error::from(e).context(format!("clustering epoch {epoch}")),
                        ),
                    }
                }
            }
        },
    )
}

/// Several processes (nothing otherwise): makes `assigner` the state after every epoch before
/// `epoch`, from the latest record before it when the assigner holds another (after a restart,
/// the epochs in between may have committed on other processes; their records are the states
/// this stage had made, and assigning is deterministic, so continuing from them decides as
/// before).
fn continue_from_record(
    ctx: &AssignContext,
    epoch: u64,
    assigner: &mut Option<Assigner>,
    state_epoch: &mut Option<u64>,
) -> anyhow::Result<()> {
    if ctx.record_states.is_none() {
        return Ok(());
    }
    let latest = ctx.store.assigned_before(epoch)?;
    if latest == *state_epoch && assigner.is_some() {
        return Ok(());
    }
    let bytes = match latest {
        Some(at) => Some(ctx.store.assigned_state(at)?.ok_or_else(|| {
            anyhow::anyhow!("internal: the assign record of epoch {at} vanished")
        })?),
        None => None,
    };
    *assigner = Some(Assigner::restore(bytes.as_deref(), ctx.dim)?);
    *state_epoch = latest;
    Ok(())
}

/// Several processes: records the state after `epoch` in the store before the epoch's
/// clusters leave the stage (`AssignContext::record_states`).
fn record_state(
    ctx: &AssignContext,
    epoch: u64,
    commit: &ClusterCommit,
    state_epoch: &mut Option<u64>,
) -> anyhow::Result<()> {
    let Some(keep) = ctx.record_states else {
        return Ok(());
    };
    ctx.store
        .record_assigned(epoch, &commit.state, epoch.saturating_sub(keep))
        .with_context(|| format!("recording the clusters of epoch {epoch}"))?;
    *state_epoch = Some(epoch);
    Ok(())
}
