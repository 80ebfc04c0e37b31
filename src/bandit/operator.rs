//! The bandit operator: plans each round on worker 0, observes its scores from the feedback
//! edge, commits the round and sends its selected rows to the round sinks, then plans the next
//! round on the aggregates that the loop's operators sent back.
//!
//! A round planned at time t observes at t+1 (its scores, and the draws' retractions) and
//! plans the next at t+2, once the round sinks' changes for its selected rows are back too. The
//! bandit's own count of what the round changed is checked against the aggregates that came
//! back, and then it is those that the next round is planned on.
//!
//! The messages it sends (`BanditMsg`) and what it takes from the feedback edge (`Feedback`,
//! `Scored`) are defined here: the membership, influence and round sink stages depend on the
//! bandit, never the other way.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{
    InputHandleCore, OperatorInfo, OutputBuilder, OutputBuilderSession,
};
use timely::dataflow::operators::Capability;
use timely::dataflow::{Stream, StreamVec};
use timely::progress::frontier::MutableAntichain;
use timely::{Container, ContainerBuilder};

use super::record::RoundRecord;
use super::{
    Bandit, ClusterChange, MemberRef, Pull, PullRequest, RoundCounts, RoundOutcome, RoundPart,
};
use crate::error::{Fail, Failed};

/// What the bandit operator needs of the job.
pub struct BanditContext {
    /// Commits a round's decision in the bandit's store: its record, the bandit state after it
    /// and its outcome (the clusters' owners carry out what it changed in theirs).
    pub commit_decision: CommitDecision,
    /// The outcome of the last round decided before this run, sent again to the clusters'
    /// owners before anything is planned: an owner killed after the decision and before its
    /// own commit carries out its part now (the others have, and skip it).
    pub replay: Option<RoundOutcome>,
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

/// Commits a round's decision: its record, the bandit after it, its outcome.
pub type CommitDecision =
    Arc<dyn Fn(&RoundRecord, &Bandit, &RoundOutcome) -> Result<()> + Send + Sync>;

/// What the bandit sends: requests to the membership of a cluster's owner, a tick to every
/// worker's membership (for the scorer), and, after a round's decision, each worker's part of
/// it to that worker's round sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BanditMsg {
    /// A pull request, to every worker (`to`): each process's first worker draws its store's
    /// candidates, the cluster's owner merges them.
    Pull {
        round: u64,
        request: PullRequest,
        to: u64,
    },
    /// To every worker's membership (`to`), which passes it to worker 0's scorer: the round
    /// goes on even when nothing is scored, and the first tick of a run carries each store's
    /// sample of the pool for fitting the scorer.
    Tick { round: u64, to: u64 },
    /// A decided round, to every worker's round sink (`to`), with what it changed of the
    /// clusters that worker owns. `replay`: sent again after a restart; its changes of the
    /// aggregates are in the bandit already.
    Committed {
        to: u64,
        part: RoundPart,
        replay: bool,
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

/// What comes back to the bandit on the feedback edge, one round later: the round's scores, and
/// the changes of the clusters' aggregates that carrying out its decisions made (members drawn
/// and scored, members selected).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Feedback {
    Scored(Scored),
    Taken(ClusterChange),
}

/// Where a bandit message goes.
pub fn route(msg: &BanditMsg, peers: u64) -> u64 {
    match msg {
        BanditMsg::Pull { to, .. }
        | BanditMsg::Tick { to, .. }
        | BanditMsg::Committed { to, .. } => *to % peers,
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
    /// (time, round, counts) of an observed round whose changes of the aggregates are
    /// awaited through `time`, with the counts the bandit expects them to make (None for a
    /// replayed round: see `hand_over`).
    returning: Option<(u64, u64, Option<RoundCounts>)>,
    /// The last round decided before this run, to send again first.
    replay: Option<RoundOutcome>,
    peers: usize,
}

pub fn bandit_operator<'scope>(
    changes: StreamVec<'scope, u64, ClusterChange>,
    feedback: StreamVec<'scope, u64, Feedback>,
    bandit: Option<Bandit>,
    ctx: Arc<BanditContext>,
) -> StreamVec<'scope, u64, BanditMsg> {
    let scope = changes.scope();
    let peers = scope.peers() as u64;
    planner::<_, _, CapacityContainerBuilder<Vec<BanditMsg>>, _, _, _, _>(
        changes,
        feedback,
        Exchange::new(|_: &ClusterChange| 0),
        Exchange::new(|_: &Feedback| 0),
        "Bandit",
        move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut side = bandit.map(|bandit| BanditSide {
                bandit,
                ctx: ctx.clone(),
                cap: Some(capability),
                in_flight: None,
                returning: None,
                replay: ctx.replay.clone(),
                peers: peers as usize,
            });
            let mut stash: BTreeMap<u64, (Scored, Vec<ClusterChange>)> = BTreeMap::new();
            // Changes wait while a round is in flight: the round is observed against the state
            // it was planned with, and new members join between rounds.
            let mut arrived: Vec<ClusterChange> = Vec::new();
            move |(changes, changes_frontier), (feedback, feedback_frontier), output| {
                changes.for_each_stamp(|_cap, data| {
                    for container in data {
                        arrived.append(container);
                    }
                });
                feedback.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else {
                        return;
                    };
                    let (scored, taken) = stash.entry(time).or_default();
                    for container in data {
                        for part in container.drain(..) {
                            match part {
                                Feedback::Scored(part) => {
                                    scored.pulls.extend(part.pulls);
                                    scored.scores.extend(part.scores);
                                    scored.unscorable.extend(part.unscorable);
                                }
                                Feedback::Taken(change) => taken.push(change),
                            }
                        }
                    }
                });
                let Some(side) = side.as_mut() else {
                    return;
                };
                let Some(cap) = side.cap.clone() else {
                    return;
                };
                if let Some(sent) = side.replay_first(&cap, &mut arrived, changes_frontier, output)
                {
                    if sent {
                        activator.activate();
                    }
                    return;
                }
                if let Some((time, round)) = side.in_flight {
                    if feedback_frontier.less_equal(&(time + 1)) {
                        return; // scores of the round in flight still to come
                    }
                    side.in_flight = None;
                    // The draws' retractions stay for `take_back`.
                    let entry = stash.entry(time + 1).or_default();
                    let scored = std::mem::take(&mut entry.0);
                    if (ctx.failed)() {
                        side.cap = None;
                        return;
                    }
                    match side.observe(round, scored) {
                        Ok((outcome, counts)) => {
                            // The selected rows' changes come back at time + 2.
                            let (counts, through) = (Some(counts), time + 2);
                            side.hand_over(cap, &outcome, false, counts, through, output);
                            activator.activate();
                            return;
                        }
                        Err(e) => {
                            (ctx.fail)(e);
                            side.cap = None;
                            return;
                        }
                    }
                }
                if let Some((through, round, expected)) = side.returning.take() {
                    if feedback_frontier.less_equal(&through) {
                        side.returning = Some((through, round, expected));
                        return; // changes of the round's selection still to come
                    }
                    let later = stash.split_off(&(through + 1));
                    let back = std::mem::replace(&mut stash, later);
                    if let Err(e) = side.take_back(round, back, expected.as_ref()) {
                        (ctx.fail)(e);
                        side.cap = None;
                        return;
                    }
                }
                for change in arrived.drain(..) {
                    if let Err(e) = side.bandit.apply(&change) {
                        (ctx.fail)(e.into());
                    }
                }
                // Plan the next round once ingest has committed what it was given (a fixed run),
                // or at any time in watch mode once every store's share of the aggregates is in
                // (sent at time 0).
                let ingest_done = changes_frontier.is_empty();
                if !(ctx.watch || ingest_done) || changes_frontier.less_equal(&0) {
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
                for to in 0..peers {
                    for &request in &requests {
                        session.give(BanditMsg::Pull { round, request, to });
                    }
                    session.give(BanditMsg::Tick { round, to });
                }
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
    /// After a restart, before anything else: once every store's share of the aggregates is
    /// in (sent at time 0, so the changes' frontier is past 0), applies them and sends the
    /// last decision again. The bandit counted that round before the restart; what comes back
    /// is the members that leave the unsampled ones of the stores that carry it out only now.
    /// None when there is nothing to replay; otherwise whether it was sent.
    fn replay_first(
        &mut self,
        cap: &Capability<u64>,
        arrived: &mut Vec<ClusterChange>,
        frontier: &MutableAntichain<u64>,
        output: &mut OutputBuilderSession<'_, u64, CapacityContainerBuilder<Vec<BanditMsg>>>,
    ) -> Option<bool> {
        self.replay.as_ref()?;
        if frontier.less_equal(&0) {
            return Some(false);
        }
        for change in arrived.drain(..) {
            if let Err(e) = self.bandit.apply(&change) {
                (self.ctx.fail)(e.into());
            }
        }
        let outcome = self.replay.take()?;
        let through = *cap.time() + 1;
        self.hand_over(cap.clone(), &outcome, true, None, through, output);
        Some(true)
    }

    /// Sends a decided round to every round sink at `cap`'s time, and waits for its changes of
    /// the aggregates through `through` (`take_back` checks them against `counts`) before
    /// planning again, from there. A replayed round has no counts to check: the aggregates
    /// started from the stores as they were, some with the round carried out and some not.
    fn hand_over(
        &mut self,
        cap: Capability<u64>,
        outcome: &RoundOutcome,
        replay: bool,
        counts: Option<RoundCounts>,
        through: u64,
        output: &mut OutputBuilderSession<'_, u64, CapacityContainerBuilder<Vec<BanditMsg>>>,
    ) {
        let mut session = output.session(&cap);
        for msg in committed(outcome, self.peers, replay) {
            session.give(msg);
        }
        drop(session);
        self.returning = Some((through, outcome.round, counts));
        let mut next = cap;
        next.downgrade(&through);
        self.cap = Some(next);
    }

    /// Observes round `round` and commits its decision; returns its outcome, for the round
    /// sinks, and the counts after the round. The bandit's own counts go back to where they
    /// were before the round: the round's changes come back through the loop's aggregates
    /// (`take_back`).
    fn observe(&mut self, round: u64, scored: Scored) -> Result<(RoundOutcome, RoundCounts)> {
        let before = self.bandit.round_counts();
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
        (self.ctx.commit_decision)(&record, &self.bandit, &outcome)
            .with_context(|| format!("committing round {round}"))?;
        (self.ctx.on_round)(&outcome);
        let after = self.bandit.round_counts();
        self.bandit.restore_round_counts(&before);
        Ok((outcome, after))
    }

    /// Applies the changes of the aggregates that round `round` made (from the feedback edge,
    /// through the round's last time) and checks that they are what the round decided.
    fn take_back(
        &mut self,
        round: u64,
        back: BTreeMap<u64, (Scored, Vec<ClusterChange>)>,
        expected: Option<&RoundCounts>,
    ) -> Result<()> {
        for (_, (_, taken)) in back {
            for change in &taken {
                self.bandit
                    .apply(change)
                    .with_context(|| format!("bandit round {round}: the loop's aggregates"))?;
            }
        }
        let Some(expected) = expected else {
            return Ok(());
        };
        let got = self.bandit.round_counts();
        anyhow::ensure!(
            &got == expected,
            "internal: after round {round}, the loop's aggregates ({got:?}) differ from what the \
             round decided ({expected:?})"
        );
        Ok(())
    }
}

/// A decided round's message to each worker's round sink: each process's first worker carries
/// out the part of the members its store holds (a member's store is the one of the epoch that
/// assigned it, which the bandit does not know).
fn committed(outcome: &RoundOutcome, peers: usize, replay: bool) -> Vec<BanditMsg> {
    (0..peers.max(1) as u64)
        .map(|to| BanditMsg::Committed {
            to,
            part: outcome.part(),
            replay,
        })
        .collect()
}

/// `binary_frontier` for an operator that sends only at times of the capability it holds, never
/// at an input's: neither input is connected to the output, so the output's frontier is the
/// held capability alone. The bandit is one: its rounds go on at their own times whatever the
/// frontier of ingest's cluster changes (in watch mode, the next shard's epoch, which may not
/// come for hours), and its feedback input does not close a cycle for progress tracking.
#[allow(clippy::type_complexity)]
fn planner<'scope, C1, C2, CB, B, L, P1, P2>(
    input1: Stream<'scope, u64, C1>,
    input2: Stream<'scope, u64, C2>,
    pact1: P1,
    pact2: P2,
    name: &str,
    constructor: B,
) -> Stream<'scope, u64, CB::Container>
where
    C1: Container,
    C2: Container,
    CB: ContainerBuilder,
    B: FnOnce(Capability<u64>, OperatorInfo) -> L,
    L: FnMut(
            (
                &mut InputHandleCore<u64, C1, P1::Puller>,
                &MutableAntichain<u64>,
            ),
            (
                &mut InputHandleCore<u64, C2, P2::Puller>,
                &MutableAntichain<u64>,
            ),
            &mut OutputBuilderSession<'_, u64, CB>,
        ) + 'static,
    P1: ParallelizationContract<u64, C1>,
    P2: ParallelizationContract<u64, C2>,
{
    let mut builder = OperatorBuilder::new(name.to_owned(), input1.scope());
    let info = builder.operator_info();
    let mut input1 = builder.new_input_connection(input1, pact1, []);
    let mut input2 = builder.new_input_connection(input2, pact2, []);
    let (output, stream) = builder.new_output_connection([]);
    let mut output = OutputBuilder::from(output);
    builder.build(move |mut capabilities| {
        let capability = capabilities.pop().expect("one output");
        let mut logic = constructor(capability, info);
        move |frontiers| {
            let mut session = output.activate();
            logic(
                (&mut input1, &frontiers[0]),
                (&mut input2, &frontiers[1]),
                &mut session,
            );
        }
    });
    stream
}
