//! The membership operator: each pull drawn on the worker that owns its cluster, from the
//! store's draw order, and the texts of its members fetched back from their shards by location.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, RecordBatch};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use super::{route, BanditMsg, Fetched, LoopContext};
use crate::bandit::aggregates::{ClusterDelta, ClusterUpdate};
use crate::bandit::{DocLoc, MemberRef, PullRequest};
use crate::influence::setup::FitPool;
use crate::influence::InfluenceError;
use crate::source::{self, SourceConfig};
use crate::state::StateStore;

/// The shard file of each epoch, looked up in the store again when a new epoch appears (watch
/// mode registers shards while rounds go on).
pub struct ShardPaths {
    store: Arc<StateStore>,
    known: Mutex<BTreeMap<u64, PathBuf>>,
}

impl ShardPaths {
    pub fn new(store: Arc<StateStore>) -> ShardPaths {
        ShardPaths {
            store,
            known: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, epoch: u64) -> Result<PathBuf> {
        let mut known = self.known.lock().expect("shard paths");
        if !known.contains_key(&epoch) {
            *known = self.store.shard_paths()?;
        }
        known
            .get(&epoch)
            .cloned()
            .with_context(|| format!("no shard is recorded for epoch {epoch}"))
    }
}

/// The source settings projected to the id and text columns: what fetching texts reads (the
/// other columns, an embedding column above all, are left undecoded).
fn text_only(source: &SourceConfig) -> SourceConfig {
    SourceConfig {
        columns: Some(Vec::new()),
        ..source.clone()
    }
}

/// The factor-fitting pool sample a job's store kept during ingest (a few hundred documents):
/// named by a hash of its documents' id hashes and locations, which the factor cache key
/// uses, and fetched by location only when the factors are fitted (no pass over the pool).
pub fn stored_fit_pool(
    store: &Arc<StateStore>,
    source: &SourceConfig,
    n: usize,
) -> Result<FitPool<'static>> {
    let sample = store.fit_sample(n)?;
    let mut identity = xxhash_rust::xxh3::Xxh3::new();
    for (priority, loc) in &sample {
        for word in [*priority, loc.shard, u64::from(loc.row_group), loc.row] {
            identity.update(&word.to_le_bytes());
        }
    }
    let (store, source) = (store.clone(), source.clone());
    Ok(FitPool::Stored {
        identity: format!("{:016x}", identity.digest()),
        texts: Box::new(move || {
            let locations: Vec<DocLoc> = sample.iter().map(|(_, loc)| *loc).collect();
            let texts = texts_at(&ShardPaths::new(store), &source, &locations)
                .map_err(|e| InfluenceError::PoolSample(format!("{e:#}")))?;
            Ok(texts.into_iter().flatten().collect())
        }),
    })
}

/// The texts at `locations`, in their order (`None` where null), read back from their shards:
/// one read per shard, of the id and text columns of the row groups that hold them.
fn texts_at(
    shards: &ShardPaths,
    source: &SourceConfig,
    locations: &[DocLoc],
) -> Result<Vec<Option<String>>> {
    let mut by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for loc in locations {
        by_epoch.entry(loc.shard).or_default().push(loc.row);
    }
    let mut texts: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for (epoch, mut rows) in by_epoch {
        rows.sort_unstable();
        rows.dedup();
        let path = shards.get(epoch)?;
        let batch = source::fetch_rows(&path, &text_only(source), &rows)?;
        let column = column(&batch, &source.text_column, &path)?;
        for (i, row) in rows.iter().enumerate() {
            if let Some(text) = source::string_at(column, i) {
                texts.insert((epoch, *row), text.to_string());
            }
        }
    }
    Ok(locations
        .iter()
        .map(|loc| texts.get(&(loc.shard, loc.row)).cloned())
        .collect())
}

/// Draws each requested pull on the worker that owns the cluster (`cluster % peers`), from the
/// store's draw order, and fetches the texts of the members to score from their shards.
pub(super) fn membership_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: Arc<LoopContext>,
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

fn draw_and_fetch(ctx: &LoopContext, round: u64, request: &PullRequest) -> Result<Fetched> {
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
fn fetch_texts(ctx: &LoopContext, members: &[MemberRef]) -> Vec<Result<String, String>> {
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

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &std::path::Path) -> Result<&'a ArrayRef> {
    let index = batch
        .schema()
        .index_of(name)
        .with_context(|| format!("{}: column '{name}' is missing", path.display()))?;
    Ok(batch.column(index))
}

/// The retractions of a round's draws, on the worker that drew them: each member of a scored
/// pull leaves its cluster's unsampled members (block and explore members leave only when
/// taken; the round sinks retract those).
pub(super) fn sampled_updates<'scope>(
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
