//! The Quad loop (DESIGN 1.2 and 2.1), in the job's one dataflow: bandit rounds are
//! timestamps, and the scores come back to the bandit through a feedback edge.
//!
//!   cluster changes (from the ingest sink) ─▶ bandit (worker 0, O(k) state)
//!                                               │ pull requests (cluster, n, round)
//!                                               ▼
//!               membership (worker cluster % peers): seeded draw from the store, fetch texts
//!                                               │
//!               score (worker 0: the process's influence model) ─▶ feedback (+1) ─▶ bandit
//!   bandit ─▶ selected rows ─▶ round sink (worker cluster % peers): files of min_file_rows
//!
//! Round r is planned at time t: the bandit sends one request per pulled cluster to the
//! cluster's owner, which draws the sample from the store (a function of the seed, the round
//! and the cluster's unsampled members, whatever the number of workers), fetches the texts and
//! sends them to the scorer. The scorer scores in a fixed order (so batches, and hence
//! floating-point results, do not depend on the worker count) and sends the pulls and scores
//! into the feedback edge, where they arrive at t+1. The bandit observes them, commits the
//! round (what it changed only) in one store transaction, sends the selected rows to their
//! owners' round sinks, and plans round r+1 at t+1.
//!
//! The bandit plans only once ingest has committed everything it was given (a run over a
//! fixed set of shards: deterministic), or at any time in watch mode, where new shards' cluster
//! changes join the bandit's aggregates between rounds.
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, ConnectLoop, Feedback as _, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};

use crate::bandit::{Bandit, ClusterChange, MemberRef, Pull, PullRequest, RoundOutcome};
use crate::sink::SinkConfig;
use crate::source::SourceConfig;
use crate::state::StateStore;

mod bandit;
mod membership;
mod round_sink;
mod score;

use crate::bandit::aggregates::cluster_aggregates;
use bandit::bandit_operator;
use membership::{membership_operator, sampled_updates};
pub use membership::{stored_fit_pool, ShardPaths};
use round_sink::round_sink_operator;
pub use round_sink::{round_file_name, SOURCE_COLUMN};
use score::score_operator;
pub use score::{ScoreTally, TalliedScorer};

/// Scores documents by their texts; the influence scorer implements it. A document that cannot
/// be scored (too short to predict a token, a score that is not finite) gets the reason.
pub trait DocScorer {
    fn score(&mut self, texts: &[&str]) -> Result<Vec<Result<f64, String>>>;
}

/// Builds the scorer on the worker that scores (models are not shared across threads).
pub type ScorerFactory = Arc<dyn Fn() -> Result<Box<dyn DocScorer>> + Send + Sync>;

/// What the loop needs besides the bandit.
pub struct LoopContext {
    pub store: Arc<StateStore>,
    pub seed: u64,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub shards: ShardPaths,
    pub scorer: ScorerFactory,
    /// Long-lived mode: plan whenever there is budget, and wait for new shards when done.
    pub watch: bool,
    /// Called on worker 0 after each committed round (progress, summary).
    pub on_round: Arc<dyn Fn(&RoundOutcome) + Send + Sync>,
    /// Called after each committed output file (name, rows).
    pub on_file: Arc<dyn Fn(&str, usize) + Send + Sync>,
    /// Set when a stop was requested: finish the round in flight, then stop.
    pub stop: &'static AtomicBool,
    /// Reports a failure on any worker; the bandit then neither observes nor plans again, so
    /// the loop drains and the job ends with the error (nothing half-observed is committed).
    pub fail: Arc<dyn Fn(anyhow::Error) + Send + Sync>,
    pub failed: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Test hook: abort after a file closed at this round or later is in place, before its
    /// commit.
    pub crash_after_round: Option<u64>,
}

/// What the bandit sends: requests to the membership of a cluster's owner, a tick to the
/// scorer, and, after a round's commit, its selected rows to their owners' round sinks.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum BanditMsg {
    Pull {
        round: u64,
        request: PullRequest,
    },
    /// To worker 0's scorer, so the round goes on even when nothing is scored.
    Tick {
        round: u64,
    },
    /// A committed round, to every worker's round sink (`to`), with its selected members of
    /// the clusters that worker owns, each marked when it was taken unscored (block, explore).
    Committed {
        round: u64,
        to: u64,
        selected: Vec<(MemberRef, bool)>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Fetched {
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

/// A round's pulls as drawn, with the scores of their scored members, for the bandit. A member
/// that could not be scored has a NaN score (the bandit neither credits nor selects it) and its
/// reason in `unscorable`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Scored {
    pulls: Vec<Pull>,
    scores: Vec<(MemberRef, f64)>,
    unscorable: Vec<(MemberRef, String)>,
}

/// What comes back to the bandit on the feedback edge, one round later: the round's scores, and
/// the changes of the clusters' aggregates that carrying out its decisions made (members drawn
/// and scored, members selected).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Feedback {
    Scored(Scored),
    Taken(ClusterChange),
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
pub fn build_loop<'scope>(
    changes: StreamVec<'scope, u64, ClusterChange>,
    bandit: Option<Bandit>,
    ctx: Arc<LoopContext>,
    probe: &ProbeHandle<u64>,
) {
    let scope = changes.scope();
    let (handle, feedback) = scope.feedback::<Vec<Feedback>>(1);
    let messages = bandit_operator(changes, feedback, bandit, ctx.clone());
    let peers = scope.peers() as u64;
    let index = scope.index() as u64;
    let selected = round_sink_operator(messages.clone(), ctx.clone(), index, peers);
    let fetched = membership_operator(messages, ctx.clone(), peers);
    let taken =
        cluster_aggregates(sampled_updates(fetched.clone()).concat(selected.probe_with(probe)))
            .map(Feedback::Taken);
    score_operator(fetched, ctx)
        .probe_with(probe)
        .map(Feedback::Scored)
        .concat(taken)
        .connect_loop(handle);
}

/// Where a bandit message goes.
fn route(msg: &BanditMsg, peers: u64) -> u64 {
    match msg {
        BanditMsg::Pull { request, .. } => u64::from(request.cluster) % peers,
        BanditMsg::Tick { .. } => 0,
        BanditMsg::Committed { to, .. } => *to,
    }
}
