//! The membership operators: each pull drawn from the draw order of every store that holds
//! members of its cluster, merged on the worker that owns the cluster, and the texts of its
//! members fetched back from their shards by location.
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::{texts_at, ShardPaths};
use crate::bandit::aggregates::{ClusterDelta, ClusterUpdate};
use crate::bandit::draw::{merge_candidates, DrawCandidate};
use crate::bandit::operator::{route, BanditMsg};
use crate::bandit::{DocLoc, MemberRef, Pull, PullRequest};
use crate::error::Fail;
use crate::source::SourceConfig;
use crate::state::StateStore;

/// What the membership operator needs of the job.
pub struct MembershipContext {
    pub store: Arc<StateStore>,
    pub seed: u64,
    pub source: SourceConfig,
    pub shards: Arc<ShardPaths>,
    /// How many of the pool's documents the scorer is fitted on (`influence.fit_pool_docs`):
    /// the first tick of a run carries this store's first so many of its sample.
    pub fit_pool_docs: usize,
    /// Whether this worker answers for the process's store (its first worker; the others
    /// share the store).
    pub holds_store: bool,
    pub fail: Fail,
}

/// What the membership operator sends the scorer: a drawn pull, or a round's tick.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Fetched {
    Drawn {
        round: u64,
        pull: Pull,
        /// Texts of the sample's members, in member order, when the pull is scored; the reason
        /// where a text could not be fetched again (null now, the shard gone).
        texts: Vec<Result<String, String>>,
    },
    /// A round's tick from one worker; the first of a run carries the worker's store's sample
    /// of the pool (`StateStore::fit_sample`), of which the scorer takes the first over all
    /// stores.
    Tick {
        round: u64,
        fit_sample: Vec<(u64, DocLoc)>,
    },
}

/// One store's part of a round's draws, on its way to the cluster's owner; or a worker's tick.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Drawing {
    Candidates {
        round: u64,
        request: PullRequest,
        candidates: Vec<DrawCandidate>,
    },
    Tick {
        round: u64,
        fit_sample: Vec<(u64, DocLoc)>,
    },
}

/// Draws each requested pull from every store that holds members of its cluster (each process
/// keeps the members of the shards it read): every process's first worker sends its store's
/// candidates to the worker that owns the cluster (`cluster % peers`), which takes the first of
/// them all in the draw order (the draw one store of every member would make) and fetches the
/// texts of the members to score from their shards.
pub fn membership_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: MembershipContext,
    peers: u64,
) -> StreamVec<'scope, u64, Fetched> {
    let ctx = Arc::new(ctx);
    let drawing = candidates_operator(messages, ctx.clone(), peers);
    draw_operator(drawing, ctx, peers)
}

/// Each store's candidates for every requested pull, from the process's first worker (the
/// others share its store), and every worker's tick (the first of a run with its store's
/// sample of the pool for fitting the scorer).
fn candidates_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: Arc<MembershipContext>,
    peers: u64,
) -> StreamVec<'scope, u64, Drawing> {
    messages.unary::<CapacityContainerBuilder<Vec<Drawing>>, _, _, _>(
        Exchange::new(move |m: &BanditMsg| route(m, peers)),
        "DrawCandidates",
        move |_capability, _info| {
            let mut ticked = false;
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let mut session = output.session(&cap);
                    for container in data {
                        for msg in container.drain(..) {
                            match msg {
                                BanditMsg::Tick { round, .. } => {
                                    let first = !std::mem::replace(&mut ticked, true);
                                    let fit_sample = if first && ctx.holds_store {
                                        ctx.store.fit_sample(ctx.fit_pool_docs).unwrap_or_else(
                                            |e| {
                                                (ctx.fail)(e.into());
                                                Vec::new()
                                            },
                                        )
                                    } else {
                                        Vec::new()
                                    };
                                    session.give(Drawing::Tick { round, fit_sample });
                                }
                                BanditMsg::Pull { round, request, .. } if ctx.holds_store => {
                                    match ctx.store.draw_candidates(ctx.seed, round, &request) {
                                        Ok(candidates) => session.give(Drawing::Candidates {
                                            round,
                                            request,
                                            candidates,
                                        }),
                                        Err(e) => {
                                            (ctx.fail)(anyhow::Error::from(e).context(format!(
                                                "drawing round {round}'s sample of cluster {}",
                                                request.cluster
                                            )))
                                        }
                                    }
                                }
                                BanditMsg::Pull { .. } | BanditMsg::Committed { .. } => {}
                            }
                        }
                    }
                });
            }
        },
    )
}

/// On the cluster's owner, once every store's candidates for a time are in: each pull as the
/// first of its candidates, with the texts of the members to score.
fn draw_operator<'scope>(
    drawing: StreamVec<'scope, u64, Drawing>,
    ctx: Arc<MembershipContext>,
    peers: u64,
) -> StreamVec<'scope, u64, Fetched> {
    let owner = move |d: &Drawing| match d {
        Drawing::Candidates { request, .. } => u64::from(request.cluster) % peers,
        Drawing::Tick { .. } => 0,
    };
    drawing.unary_frontier::<CapacityContainerBuilder<Vec<Fetched>>, _, _, _>(
        Exchange::new(owner),
        "Draw",
        move |_capability, _info| {
            type Pulls = BTreeMap<(u64, u32), (PullRequest, Vec<DrawCandidate>)>;
            let mut stash: BTreeMap<u64, (Capability<u64>, Pulls)> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let time = *cap.time();
                    let mut session = output.session(&cap);
                    let pulls = &mut stash
                        .entry(time)
                        .or_insert_with(|| (cap.clone(), BTreeMap::new()))
                        .1;
                    for container in data {
                        for msg in container.drain(..) {
                            match msg {
                                Drawing::Tick { round, fit_sample } => {
                                    session.give(Fetched::Tick { round, fit_sample });
                                }
                                Drawing::Candidates {
                                    round,
                                    request,
                                    candidates,
                                } => pulls
                                    .entry((round, request.cluster))
                                    .or_insert_with(|| (request, Vec::new()))
                                    .1
                                    .extend(candidates),
                            }
                        }
                    }
                });
                while let Some((&time, _)) = stash.first_key_value() {
                    if frontier.less_equal(&time) {
                        break;
                    }
                    let (cap, pulls) = stash.remove(&time).expect("first key");
                    let mut session = output.session(&cap);
                    for ((round, _), (request, candidates)) in pulls {
                        let started = std::time::Instant::now();
                        let pull = merge_candidates(&request, candidates);
                        let texts = if pull.score {
                            fetch_texts(&ctx, &pull.members)
                        } else {
                            Vec::new()
                        };
                        tracing::debug!(
                            round,
                            cluster = request.cluster,
                            seconds = started.elapsed().as_secs_f64(),
                            "drawn and fetched"
                        );
                        session.give(Fetched::Drawn { round, pull, texts });
                    }
                }
            }
        },
    )
}

/// The texts of members in member order (a null text, which ingest rejects, is an error
/// naming the shard, row and column).
/// The members' texts, fetched again by location; where one cannot be had (null now, the shard
/// unreadable or gone) the reason, so that member is rejected and the round goes on.
fn fetch_texts(ctx: &MembershipContext, members: &[MemberRef]) -> Vec<Result<String, String>> {
    let locations: Vec<DocLoc> = members.iter().map(|m| m.loc).collect();
    let where_ = |loc: &DocLoc| match ctx.shards.get(loc.shard) {
        Ok(path) => format!("{}: row {}", path.display(), loc.row),
        Err(_) => format!("epoch {}: row {}", loc.shard, loc.row),
    };
    match texts_at(&ctx.shards, &ctx.source, &locations) {
        Ok(texts) => texts
            .into_iter()
            .zip(&locations)
            .map(|(text, loc)| {
                text.ok_or_else(|| {
                    format!(
                        "{}, column '{}': text is null on fetch",
                        where_(loc),
                        ctx.source.text_column
                    )
                })
            })
            .collect(),
        Err(e) => locations
            .iter()
            .map(|loc| Err(format!("{}: fetching the text: {e:#}", where_(loc))))
            .collect(),
    }
}

/// The retractions of a round's draws, on the worker that drew them: each member of a scored
/// pull leaves its cluster's unsampled members (block and explore members leave only when
/// taken; the round sinks retract those).
pub fn sampled_updates<'scope>(
    fetched: StreamVec<'scope, u64, Fetched>,
) -> StreamVec<'scope, u64, ClusterUpdate> {
    fetched.unary::<CapacityContainerBuilder<Vec<ClusterUpdate>>, _, _, _>(
        Pipeline,
        "SampledUpdates",
        |_capability, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let time = *cap.time();
                    let mut session = output.session(&cap);
                    for container in data {
                        for msg in container.iter() {
                            if let Fetched::Drawn { pull, .. } = msg {
                                if pull.score {
                                    for m in &pull.members {
                                        session.give((m.cluster, time, ClusterDelta::sampled()));
                                    }
                                }
                            }
                        }
                    }
                });
            }
        },
    )
}
