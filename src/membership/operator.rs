//! The membership operator: each pull drawn on the worker that owns its cluster, from the
//! store's draw order, and the texts of its members fetched back from their shards by location.
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use super::{texts_at, ShardPaths};
use crate::bandit::aggregates::{ClusterDelta, ClusterUpdate};
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
    Tick {
        round: u64,
    },
}

/// Draws each requested pull on the worker that owns the cluster (`cluster % peers`), from the
/// store's draw order, and fetches the texts of the members to score from their shards.
pub fn membership_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: MembershipContext,
    peers: u64,
) -> StreamVec<'scope, u64, Fetched> {
    messages.unary::<CapacityContainerBuilder<Vec<Fetched>>, _, _, _>(
        Exchange::new(move |m: &BanditMsg| route(m, peers)),
        "Membership",
        move |_capability, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let mut session = output.session(&cap);
                    for container in data {
                        for msg in container.drain(..) {
                            match msg {
                                BanditMsg::Tick { round } => session.give(Fetched::Tick { round }),
                                BanditMsg::Pull { round, request } => {
                                    match draw_and_fetch(&ctx, round, &request) {
                                        Ok(fetched) => session.give(fetched),
                                        Err(e) => (ctx.fail)(e),
                                    }
                                }
                                BanditMsg::Committed { .. } => {}
                            }
                        }
                    }
                });
            }
        },
    )
}

fn draw_and_fetch(ctx: &MembershipContext, round: u64, request: &PullRequest) -> Result<Fetched> {
    let started = std::time::Instant::now();
    let pull = ctx.store.draw(ctx.seed, round, request).with_context(|| {
        format!(
            "drawing round {round}'s sample of cluster {}",
            request.cluster
        )
    })?;
    let texts = if pull.score {
        fetch_texts(ctx, &pull.members)
    } else {
        Vec::new()
    };
    tracing::debug!(
        round,
        cluster = request.cluster,
        seconds = started.elapsed().as_secs_f64(),
        "drawn and fetched"
    );
    Ok(Fetched::Drawn { round, pull, texts })
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
