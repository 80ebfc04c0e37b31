//! The Quad loop (DESIGN 1.2 and 2.1), in the job's one dataflow: bandit rounds are
//! timestamps, and the scores come back to the bandit through a feedback edge.
//!
//!   cluster changes (from the ingest sink) ─▶ bandit (worker 0, O(k) state)
//!                                               │ pull requests (cluster, n, round), to all
//!                                               ▼
//!     candidates (each process's first worker: its store's first members in the draw order)
//!                                               │
//!     draw (worker cluster % peers): the first of all candidates, texts fetched by location
//!                                               │
//!     score (the first worker of process cluster % processes: its model, on its GPU)
//!                                               │
//!                                  feedback (+1) ─▶ bandit
//!   bandit ─▶ decided round ─▶ round sink (each process's first worker): its store's part
//!                              carried out, selected rows into files of min_file_rows
//!
//! Round r is planned at time t: the bandit sends each pull request to every worker; the first
//! worker of each process sends its store's candidates (each store holds the members of the
//! shards its process read) to the cluster's owner, which takes the first of them all in the
//! draw order (a function of the seed, the round and the cluster's unsampled members, whatever
//! the number of workers and processes), fetches the texts and sends them to the cluster's
//! scorer. A scorer batches each cluster's sample on its own in member order (so batches, and
//! hence floating-point results, do not depend on the number of workers or processes) and
//! sends the pulls and scores into the feedback edge, where they
//! arrive at t+1. The bandit observes them, commits the round's decision in its store, sends
//! it to every process (whose first worker carries out the part that concerns the members its
//! store holds, once, and writes their selected rows), and plans round r+1 at
//! t+2, once those changes are back. After a restart the bandit sends the last decision again
//! before anything else: a worker that had not carried out its part does so then.
//!
//! The bandit plans only once ingest has committed everything it was given (a run over a
//! fixed set of shards: deterministic), or at any time in watch mode, where new shards' cluster
//! changes join the bandit's aggregates between rounds.
//!
//! The operators live in their stages (`bandit::operator`, `membership::operator`,
//! `influence::operator`, `sink::round_sink`), each taking its own context; this module wires
//! them into the loop.
use std::sync::Arc;

use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, ConnectLoop, Feedback as _, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};

use crate::bandit::aggregates::cluster_aggregates;
use crate::bandit::operator::{bandit_operator, BanditContext, Feedback};
use crate::bandit::{Bandit, ClusterChange};
use crate::influence::operator::{score_operator, ScoreContext};
use crate::membership::operator::{membership_operator, sampled_updates, MembershipContext};
use crate::sink::round_sink::{round_sink_operator, RoundSinkContext};

/// What the loop's operators take of the job on this worker, one context a stage.
pub(super) struct LoopContext {
    pub(super) bandit: BanditContext,
    pub(super) membership: MembershipContext,
    pub(super) score: ScoreContext,
    pub(super) round_sink: RoundSinkContext,
}

/// Builds the loop in the job's dataflow: returns nothing, but every stream it ends in is
/// attached to `probe`, which is done once the loop has drained and the last file is closed.
///
/// The clusters' aggregates have two differential collections of cluster ids (see
/// `bandit::aggregates`): members joining, by epoch (`changes`, from ingest), and members
/// leaving the unsampled ones or being selected, by round (`taken`: retractions made where the
/// members are, by the membership operator as it draws and by the round sinks as they take the
/// selected rows). Each is arranged by cluster id. They are two collections because their
/// times are two clocks: a round's retractions must not wait for the next shard in watch mode.
pub(super) fn build_loop<'scope>(
    changes: StreamVec<'scope, u64, ClusterChange>,
    bandit: Option<Bandit>,
    ctx: LoopContext,
    probe: &ProbeHandle<u64>,
) {
    let scope = changes.scope();
    let (handle, feedback) = scope.feedback::<Vec<Feedback>>(1);
    let messages = bandit_operator(changes, feedback, bandit, Arc::new(ctx.bandit));
    let peers = scope.peers() as u64;
    let index = scope.index() as u64;
    let selected = round_sink_operator(messages.clone(), ctx.round_sink, index, peers);
    let fetched = membership_operator(messages, ctx.membership, peers);
    let taken =
        cluster_aggregates(sampled_updates(fetched.clone()).concat(selected.probe_with(probe)))
            .map(Feedback::Taken);
    score_operator(fetched, ctx.score)
        .probe_with(probe)
        .map(Feedback::Scored)
        .concat(taken)
        .connect_loop(handle);
}
