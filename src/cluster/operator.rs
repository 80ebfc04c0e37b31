//! The assign operator: documents to clusters on worker 0, epoch by epoch in order.
use std::collections::BTreeMap;
use std::sync::Arc;

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
            let stored = ctx.store.clusterer_state();
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
            let mut semdedup = match ctx
                .semdedup
                .clone()
                .map(|s| SemDedup::new(s, dim, ctx.store.clone()))
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
