//! The bandit operator: plans each round on worker 0, observes its scores from the feedback
//! edge, commits the round and sends its selected rows to the round sinks. The messages it
//! sends (`BanditMsg`) and the scored pulls it observes (`Scored`) are defined here: the
//! membership, influence and round sink stages depend on the bandit, never the other way.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::record::RoundRecord;
use super::{Bandit, ClusterChange, MemberRef, Pull, PullRequest, RoundOutcome};
use crate::error::{Fail, Failed};

/// What the bandit operator needs of the job.
pub struct BanditContext {
    /// Commits a round in one store transaction: its record, the bandit state after it and
    /// what it changed.
    pub commit_round: CommitRound,
    /// Called on worker 0 after each committed round (progress, summary).
    pub on_round: Arc<dyn Fn(&RoundOutcome) + Send + Sync>,
    /// Long-lived mode: plan whenever there is budget, and wait for new shards when done.
    pub watch: bool,
    /// Set when a stop was requested: finish the round in flight, then stop.
    pub stop: &'static AtomicBool,
    /// Reports a failure on any worker; the bandit then neither observes nor plans again, so
    /// the loop drains and the job ends with the error (nothing half-observed is committed).
    pub fail: Fail,
    pub failed: Failed,
}

/// Commits a round: its record, the bandit after it, its outcome.
pub type CommitRound =
    Arc<dyn Fn(&RoundRecord, &Bandit, &RoundOutcome) -> Result<()> + Send + Sync>;

/// What the bandit sends: requests to the membership of a cluster's owner, a tick to the
/// scorer, and, after a round's commit, its selected rows to their owners' round sinks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BanditMsg {
    Pull {
        round: u64,
        request: PullRequest,
    },
    /// To worker 0's scorer, so the round goes on even when nothing is scored.
    Tick {
        round: u64,
    },
    /// A committed round, to every worker's round sink (`to`), with its rows of the clusters
    /// that worker owns.
    Committed {
        round: u64,
        to: u64,
        rows: usize,
    },
}

/// A round's pulls as drawn, with the scores of their scored members, for the bandit. A member
/// that could not be scored has a NaN score (the bandit neither credits nor selects it) and its
/// reason in `unscorable`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scored {
    pub pulls: Vec<Pull>,
    pub scores: Vec<(MemberRef, f64)>,
    pub unscorable: Vec<(MemberRef, String)>,
}

/// Where a bandit message goes.
pub fn route(msg: &BanditMsg, peers: u64) -> u64 {
    match msg {
        BanditMsg::Pull { request, .. } => u64::from(request.cluster) % peers,
        BanditMsg::Tick { .. } => 0,
        BanditMsg::Committed { to, .. } => *to,
    }
}

/// The bandit's side of the loop, on worker 0.
struct BanditSide {
    bandit: Bandit,
    ctx: Arc<BanditContext>,
    /// The capability rounds are planned with; None once the loop is over.
    cap: Option<Capability<u64>>,
    /// (time, round) of the round whose scores are awaited.
    in_flight: Option<(u64, u64)>,
    peers: usize,
}

pub fn bandit_operator<'scope>(
    changes: StreamVec<'scope, u64, ClusterChange>,
    scores: StreamVec<'scope, u64, Scored>,
    bandit: Option<Bandit>,
    ctx: BanditContext,
) -> StreamVec<'scope, u64, BanditMsg> {
    let ctx = Arc::new(ctx);
    let scope = changes.scope();
    let peers = scope.peers() as u64;
    changes.binary_frontier::<_, CapacityContainerBuilder<Vec<BanditMsg>>, _, _, _, _>(
        scores,
        Exchange::new(|_: &ClusterChange| 0),
        Exchange::new(|_: &Scored| 0),
        "Bandit",
        move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut side = bandit.map(|bandit| BanditSide {
                bandit,
                ctx: ctx.clone(),
                cap: Some(capability),
                in_flight: None,
                peers: peers as usize,
            });
            let mut stash: BTreeMap<u64, Scored> = BTreeMap::new();
            // Changes wait while a round is in flight: the round is observed against the state
            // it was planned with, and new members join between rounds.
            let mut arrived: Vec<ClusterChange> = Vec::new();
            move |(changes, changes_frontier), (scores, scores_frontier), output| {
                changes.for_each_stamp(|_cap, data| {
                    for container in data {
                        arrived.append(container);
                    }
                });
                scores.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else {
                        return;
                    };
                    let entry = stash.entry(time).or_default();
                    for container in data {
                        for part in container.drain(..) {
                            entry.pulls.extend(part.pulls);
                            entry.scores.extend(part.scores);
                            entry.unscorable.extend(part.unscorable);
                        }
                    }
                });
                let Some(side) = side.as_mut() else {
                    return;
                };
                let Some(cap) = side.cap.clone() else {
                    return;
                };
                if let Some((time, round)) = side.in_flight {
                    if scores_frontier.less_equal(&(time + 1)) {
                        return; // scores of the round in flight still to come
                    }
                    side.in_flight = None;
                    let scored = stash.remove(&(time + 1)).unwrap_or_default();
                    stash.retain(|&t, _| t > time + 1);
                    if (ctx.failed)() {
                        side.cap = None;
                        return;
                    }
                    match side.observe(round, scored) {
                        Ok(rows) => {
                            let mut session = output.session(&cap);
                            for (to, rows) in rows.into_iter().enumerate() {
                                session.give(BanditMsg::Committed {
                                    round,
                                    to: to as u64,
                                    rows,
                                });
                            }
                        }
                        Err(e) => {
                            (ctx.fail)(e);
                            side.cap = None;
                            return;
                        }
                    }
                }
                for change in arrived.drain(..) {
                    if let Err(e) = side.bandit.apply(&change) {
                        (ctx.fail)(e.into());
                    }
                }
                // Plan the next round once ingest has committed what it was given (a fixed run),
                // or at any time in watch mode.
                let ingest_done = changes_frontier.is_empty();
                if !(ctx.watch || ingest_done) {
                    return;
                }
                if (ctx.failed)() || ctx.stop.load(Ordering::SeqCst) {
                    side.cap = None;
                    return;
                }
                let round = side.bandit.next_round();
                let requests = side.bandit.plan_round(round);
                if requests.is_empty() {
                    if ingest_done && !ctx.watch {
                        side.cap = None; // done: budget reached or nothing left
                    } else {
                        // Long-lived: new shards may open arms again; look for a stop meanwhile.
                        activator.activate_after(Duration::from_millis(200));
                    }
                    return;
                }
                let time = *cap.time();
                let mut session = output.session(&cap);
                for request in requests {
                    session.give(BanditMsg::Pull { round, request });
                }
                session.give(BanditMsg::Tick { round });
                drop(session);
                side.in_flight = Some((time, round));
                let mut next = cap;
                next.downgrade(&(time + 1));
                side.cap = Some(next);
            }
        },
    )
}

impl BanditSide {
    /// Observes round `round` and commits it; returns the number of selected rows per worker
    /// (by cluster owner), for the round sinks.
    fn observe(&mut self, round: u64, scored: Scored) -> Result<Vec<usize>> {
        let plan = self.bandit.plan_round(round);
        let mut by_cluster: BTreeMap<u32, Pull> =
            scored.pulls.into_iter().map(|p| (p.cluster, p)).collect();
        let pulls: Vec<Pull> = plan
            .iter()
            .filter_map(|r| by_cluster.remove(&r.cluster))
            .collect();
        let mut outcome = self
            .bandit
            .observe(round, &pulls, &scored.scores)
            .with_context(|| format!("bandit round {round}"))?;
        // The scorer's reasons replace the bandit's "not finite" where it knows better.
        let reasons: BTreeMap<MemberRef, String> = scored.unscorable.into_iter().collect();
        for (member, reason) in &mut outcome.unscorable {
            if let Some(known) = reasons.get(member) {
                reason.clone_from(known);
            }
            tracing::warn!(
                round,
                cluster = member.cluster,
                shard = member.loc.shard,
                row = member.loc.row,
                %reason,
                "document not scored: rejected"
            );
        }
        let record = RoundRecord::new(&pulls, &outcome);
        (self.ctx.commit_round)(&record, &self.bandit, &outcome)
            .with_context(|| format!("committing round {round}"))?;
        (self.ctx.on_round)(&outcome);
        let peers = self.peers.max(1);
        let mut rows = vec![0; peers];
        for (m, _) in &outcome.selected {
            rows[m.cluster as usize % peers] += 1;
        }
        Ok(rows)
    }
}
