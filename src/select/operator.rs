//! The admit operator: dedup and, for `random`, the selection, on worker 0 in epoch order.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::{Admitter, SelectConfig, Verdicts};
use crate::error::Fail;
use crate::source::operator::EpochDocs;
use crate::source::DocMeta;
use crate::state::StateStore;

/// What the admit operator needs of the job.
pub struct AdmitContext {
    pub seed: u64,
    pub select: SelectConfig,
    pub dedup: crate::dedup::DedupConfig,
    pub store: Arc<StateStore>,
    /// Size of the in-memory filter in front of the store's duplicate-id lookups, in bytes.
    pub dedup_filter_bytes: usize,
    /// A job of several processes: the admit stage records its decisions in the store
    /// (`Admitter::recording_decisions`).
    pub records_decisions: bool,
    /// Set by a stop request: epochs after one that was not read are left for the next run.
    pub stop: &'static AtomicBool,
    pub fail: Fail,
}

/// Decides each epoch on worker 0, strictly in epoch order once no more of its documents can
/// come: duplicates (ids seen in an earlier position) and, for `random`, the selection.
pub fn admit_operator<'scope>(
    docs: StreamVec<'scope, u64, EpochDocs>,
    ctx: AdmitContext,
) -> StreamVec<'scope, u64, Verdicts> {
    docs.unary_frontier::<CapacityContainerBuilder<Vec<Verdicts>>, _, _, _>(
            Exchange::new(|_: &EpochDocs| 0),
            "Admit",
            move |_capability, _info| {
                let mut admitter = match Admitter::new(
                    ctx.seed,
                    ctx.select.clone(),
                    ctx.dedup.clone(),
                    ctx.store.clone(),
                    ctx.dedup_filter_bytes,
                )
                .and_then(|admitter| {
                    if ctx.records_decisions {
                        admitter.recording_decisions()
                    } else {
                        Ok(admitter)
                    }
                }) {
                    Ok(admitter) => Some(admitter),
                    Err(e) => {
                        (ctx.fail)(e.into());
                        None
                    }
                };
                let mut stash: BTreeMap<u64, (Capability<u64>, Vec<DocMeta>)> =
                    BTreeMap::new();
                let mut decided: std::collections::BTreeSet<u64> = Default::default();
                let mut halted = false;
                move |(input, frontier), output| {
                    input.for_each_stamp(|cap, data| {
                        if let Some(cap) = cap.retain_least(output.output_index()) {
                            for container in data {
                                for epoch_docs in container.drain(..) {
                                    let entry =
                                        stash.entry(epoch_docs.epoch).or_insert_with(|| {
                                            (cap.delayed(&epoch_docs.epoch), Vec::new())
                                        });
                                    entry.1.extend(epoch_docs.docs);
                                }
                            }
                        }
                    });
                    // Decide epochs strictly in order, once no more of their documents can come.
                    while let Some((&epoch, _)) = stash.first_key_value() {
                        if frontier.less_equal(&epoch) {
                            break;
                        }
                        let (cap, mut docs) = stash.remove(&epoch).expect("first key");
                        let Some(admitter) = admitter.as_mut() else {
                            continue;
                        };
                        // After a stop request some worker may not have read an earlier
                        // epoch. Deciding later epochs without it would break shard order
                        // (dedup, budget), so they are left for the next run.
                        if ctx.stop.load(Ordering::SeqCst) && !halted {
                            match ctx.store.pending_epochs() {
                                Ok(pending) => {
                                    if let Some(missing) = pending.range(..epoch).find(|e| !decided.contains(e)) {
                                        tracing::warn!("epoch {missing} was not read before the stop; epoch {epoch} and later are left for the next run");
                                        halted = true;
                                    }
                                }
                                Err(e) => (ctx.fail)(e.into()),
                            }
                        }
                        if halted {
                            continue;
                        }
                        decided.insert(epoch);
                        match admitter.admit(epoch, &mut docs) {
                            Ok(v) => output.session(&cap).give(v),
                            Err(e) => (ctx.fail)(e.into()),
                        }
                    }
                }
            },
        )
}
