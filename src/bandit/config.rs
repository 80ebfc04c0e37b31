//! The `[bandit]` section of the job spec: the parameters of the Quad loop (DESIGN 1.2).
//!
//! Defaults: `rho = 0.2` (reward-sharing radius of the authors' code) and `gamma = 0.05` (the
//! paper's sample ratio, about 5%) come from the paper/DESIGN; `alpha = 1` is UCB1's
//! exploration weight (the paper's score is UCB1 with a weight); `n_min = 10` is the sample the
//! authors' code scores per pull; `block_size = 20000` is what their code takes in block mode;
//! `tau = 0` keeps documents whose influence is helpful (positive: a step on them lowers the
//! reference loss). `clusters_per_round = 4` and the budget of 10% of the pool's tokens are
//! this project's choices for the demo scale, to be tuned per job (`quad tune tau|gamma`).
use serde::{Deserialize, Serialize};

/// The selection strategy (`select.strategy`): `random`, `dsir` and `semdedup` decide at
/// ingest, the others run the Quad loop (`Strategy::runs_bandit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Seeded uniform sampling: each document is kept with probability `ratio`.
    Random,
    /// The Quad bandit: UCB over clusters with influence rewards (`[bandit]` section).
    Quad,
    /// The bandit with alpha = 0: after every arm's first pull, always the best mean reward.
    Exploit,
    /// Clusters chosen uniformly at random, sampled documents taken without scoring.
    Explore,
    /// Every document scored; the best by influence taken until the budget.
    TopkInfluence,
    /// Importance resampling on hashed n-gram features (Xie et al. 2023): per shard, the top
    /// `select.ratio` of documents by log importance weight plus seeded Gumbel noise.
    Dsir,
    /// Every document's mean next-token loss under the influence model; the lowest (or those
    /// in `select.perplexity_band`) taken until the budget, through the Quad loop.
    Perplexity,
    /// Near-copies in embedding space dropped (Abbas et al. 2023; `cluster::semdedup`), then
    /// seeded uniform sampling among the rest, as `random`.
    Semdedup,
}

impl Strategy {
    /// Whether the strategy selects in the Quad loop (rounds over clusters after ingest, with
    /// the `[bandit]` budget), not at ingest.
    pub fn runs_bandit(self) -> bool {
        match self {
            Strategy::Random | Strategy::Dsir | Strategy::Semdedup => false,
            Strategy::Quad
            | Strategy::Exploit
            | Strategy::Explore
            | Strategy::TopkInfluence
            | Strategy::Perplexity => true,
        }
    }

    /// Whether the loop scores every member and then takes the best until the budget
    /// (`topk-influence` by influence, `perplexity` by loss), rather than pulling arms.
    pub fn scores_everything(self) -> bool {
        matches!(self, Strategy::TopkInfluence | Strategy::Perplexity)
    }

    /// Whether the strategy needs clusters (`[cluster] enabled`).
    pub fn needs_clusters(self) -> bool {
        self.runs_bandit() || self == Strategy::Semdedup
    }
}

/// The unit of the rewards the bandit credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardScale {
    /// (mean influence - median) / robust standard deviation of the scores seen.
    #[default]
    Standardised,
    /// The sample's mean influence as it is.
    Raw,
}

/// How tau is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TauMode {
    /// Each sampled document whose influence is at least tau is selected.
    PerDocument,
    /// As `per-document`, and when the sample mean is at least tau a further block of unscored
    /// documents of the cluster is taken (what the authors' code does).
    Block,
}

/// How many tokens to select.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Budget {
    /// A fixed number of tokens, e.g. `budget = { tokens = 1000000 }`.
    Tokens(u64),
    /// A fraction of the tokens ingested so far, e.g. `budget = { ratio = 0.1 }`; in streaming
    /// mode the budget grows with the pool.
    Ratio(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanditConfig {
    /// Exploration weight of the UCB score (0 = exploitation only).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Reward-sharing radius in cosine distance between centroids.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// Fraction of a cluster sampled per pull.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// At least this many documents are sampled per pull (fewer only when the cluster has fewer left).
    #[serde(default = "default_n_min")]
    pub n_min: u64,
    /// R: clusters pulled per round.
    #[serde(default = "default_clusters_per_round")]
    pub clusters_per_round: usize,
    /// Influence threshold for selection, in the scores' own units (see `tau_quantile`).
    #[serde(default)]
    pub tau: f64,
    /// A scale-free threshold instead of `tau`: a scored document is kept when its influence
    /// is at least this quantile of the scores seen so far (this round's included), e.g. 0.5
    /// keeps the better half. Deterministic (a seeded reservoir of the scores, `scale`).
    #[serde(default)]
    pub tau_quantile: Option<f64>,
    /// What a pull's reward is: its sample's mean influence in robust standard units of the
    /// scores seen (`standardised`, the default: `alpha` then means the same on any model), or
    /// the raw mean (`raw`, as the paper).
    #[serde(default)]
    pub reward: RewardScale,
    #[serde(default = "default_mode")]
    pub mode: TauMode,
    /// Unscored documents taken per passing sample in `block` mode.
    #[serde(default = "default_block_size")]
    pub block_size: u64,
    #[serde(default = "default_budget")]
    pub budget: Budget,
}

impl Default for BanditConfig {
    fn default() -> Self {
        BanditConfig {
            alpha: default_alpha(),
            rho: default_rho(),
            gamma: default_gamma(),
            n_min: default_n_min(),
            clusters_per_round: default_clusters_per_round(),
            tau: 0.0,
            tau_quantile: None,
            reward: RewardScale::default(),
            mode: default_mode(),
            block_size: default_block_size(),
            budget: default_budget(),
        }
    }
}

fn default_alpha() -> f64 {
    1.0
}
fn default_rho() -> f64 {
    0.2
}
fn default_gamma() -> f64 {
    0.05
}
fn default_n_min() -> u64 {
    10
}
fn default_clusters_per_round() -> usize {
    4
}
fn default_mode() -> TauMode {
    TauMode::PerDocument
}
fn default_block_size() -> u64 {
    20_000
}
fn default_budget() -> Budget {
    Budget::Ratio(0.1)
}

impl BanditConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |key: &str, want: &str, got: f64| {
            Err(format!("bandit.{key} must be {want}, got {got}"))
        };
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad("alpha", "finite and >= 0", self.alpha);
        }
        if !(self.rho.is_finite() && (0.0..=2.0).contains(&self.rho)) {
            return bad("rho", "in [0, 2] (a cosine distance)", self.rho);
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return bad("gamma", "in (0, 1]", self.gamma);
        }
        if self.n_min == 0 {
            return Err("bandit.n_min must be at least 1".into());
        }
        if self.clusters_per_round == 0 {
            return Err("bandit.clusters_per_round must be at least 1".into());
        }
        if !self.tau.is_finite() {
            return bad("tau", "finite", self.tau);
        }
        if let Some(q) = self.tau_quantile {
            if !(0.0..=1.0).contains(&q) {
                return bad("tau_quantile", "in [0, 1]", q);
            }
        }
        if self.mode == TauMode::Block && self.block_size == 0 {
            return Err("bandit.block_size must be at least 1 in block mode".into());
        }
        match self.budget {
            Budget::Tokens(0) => Err("bandit.budget.tokens must be at least 1".into()),
            Budget::Ratio(r) if !(r > 0.0 && r <= 1.0) => bad("budget.ratio", "in (0, 1]", r),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_refuses_unknown_ones() {
        let c: BanditConfig = toml::from_str(
            "alpha = 0.5\nrho = 0.1\ngamma = 0.02\nn_min = 3\nclusters_per_round = 2\ntau = 0.01\ntau_quantile = 0.6\nreward = \"raw\"\nmode = \"block\"\nblock_size = 50\nbudget = { tokens = 1000 }\n",
        )
        .unwrap();
        assert_eq!(c.mode, TauMode::Block);
        assert_eq!(c.budget, Budget::Tokens(1000));
        assert_eq!(c.clusters_per_round, 2);
        assert_eq!((c.tau_quantile, c.reward), (Some(0.6), RewardScale::Raw));
        c.validate().unwrap();
        let d: BanditConfig = toml::from_str("").unwrap();
        assert_eq!(d, BanditConfig::default());
        assert!(toml::from_str::<BanditConfig>("alpah = 1.0").is_err());
        assert!(toml::from_str::<BanditConfig>("budget = { ratio = 0.1, tokens = 5 }").is_err());
        let bad: BanditConfig = toml::from_str("gamma = 0.0").unwrap();
        assert!(bad.validate().unwrap_err().contains("bandit.gamma"));
        let bad: BanditConfig = toml::from_str("tau_quantile = 1.5").unwrap();
        assert!(bad.validate().unwrap_err().contains("bandit.tau_quantile"));
        let bad: BanditConfig = toml::from_str("budget = { ratio = 1.5 }").unwrap();
        assert!(bad.validate().unwrap_err().contains("budget.ratio"));
    }
}
