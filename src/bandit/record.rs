//! What the store keeps of each round (the report reads it): per pull the cluster, the
//! sample size, its score and reward; the influences; the selection.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Pull, RoundOutcome};

/// One cluster's part of a round, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRecord {
    pub cluster: u32,
    /// Members fetched (scored, or taken unscored).
    pub sampled: u64,
    /// CS_i when chosen; `None` for an untried arm or a strategy without scores.
    pub cluster_score: Option<f64>,
    /// r_i: mean influence of the sample; `None` when not scored.
    pub reward: Option<f64>,
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub pulls: Vec<PullRecord>,
    /// Influence of every document scored in the round.
    pub influences: Vec<f64>,
    pub selected_docs: u64,
    pub selected_tokens: u64,
    /// Tokens selected by the end of this round, all rounds together.
    pub total_selected_tokens: u64,
    /// Selected tokens by the rows' source domain (older stores; the mix is now tallied per
    /// output file, `StateStore::selected_tokens_by_source`).
    #[serde(default)]
    pub selected_tokens_by_source: BTreeMap<String, u64>,
}

impl RoundRecord {
    /// The record of a round from its plan and its outcome; `selected_tokens_by_source` is
    /// left for the caller, which knows the rows.
    pub fn new(pulls: &[Pull], outcome: &RoundOutcome) -> RoundRecord {
        let rewards: BTreeMap<u32, f64> = outcome.rewards.iter().copied().collect();
        RoundRecord {
            round: outcome.round,
            pulls: pulls
                .iter()
                .map(|p| PullRecord {
                    cluster: p.cluster,
                    sampled: p.members.len() as u64,
                    cluster_score: p.cluster_score,
                    reward: rewards.get(&p.cluster).copied(),
                })
                .collect(),
            influences: outcome.scored.iter().map(|(_, v)| *v).collect(),
            selected_docs: outcome.selected.len() as u64,
            selected_tokens: outcome.selected.iter().map(|(m, _)| m.tokens).sum(),
            total_selected_tokens: outcome.selected_tokens,
            selected_tokens_by_source: BTreeMap::new(),
        }
    }
}
