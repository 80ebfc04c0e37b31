//! The assign stage (DESIGN 1.1, step 3): the first `cluster.reservoir` documents, in epoch
//! (shard) and row order, are held until the initial spherical k-means fit; from then on every
//! document goes to its nearest centroid and centroids move by mini-batch updates, a far
//! document opening a new cluster while k < k_max.
//!
//! Documents must be given in epoch order and, within an epoch, in row order; the result then
//! depends only on the seed and the input, not on the number of workers. The whole state is
//! serialised after every epoch and committed with it, so a resumed job continues exactly.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::cluster::{
    fit_spherical_kmeans, KMeansBackend, KMeansConfig, StreamConfig, StreamingClusterer,
};
use crate::config::ClusterConfig;
use crate::error::ClusterError;
use crate::source::DocMeta;
use crate::state::{ClusterCommit, ClusterInfo, Member};

#[derive(Debug, Serialize, Deserialize)]
enum Phase {
    /// Before the initial fit: the documents so far and their vectors (row-major).
    Warmup {
        members: Vec<Member>,
        vectors: Vec<f32>,
    },
    Streaming(StreamingClusterer),
}

/// The state of the assign stage.
#[derive(Debug, Serialize, Deserialize)]
pub struct Assigner {
    dim: usize,
    phase: Phase,
    /// Members and their tokens, per cluster id.
    sizes: Vec<u64>,
    tokens: Vec<u64>,
}

fn invalid(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Invalid(e.to_string())
}

impl Assigner {
    pub fn new(dim: usize) -> Assigner {
        Assigner {
            dim,
            phase: Phase::Warmup {
                members: Vec::new(),
                vectors: Vec::new(),
            },
            sizes: Vec::new(),
            tokens: Vec::new(),
        }
    }

    /// The state committed with the last epoch, or a fresh one.
    pub fn restore(bytes: Option<&[u8]>, dim: usize) -> Result<Assigner, ClusterError> {
        let Some(bytes) = bytes else {
            return Ok(Assigner::new(dim));
        };
        let assigner: Assigner = bincode::deserialize(bytes)
            .map_err(|e| invalid(format!("the stored clusterer state is unreadable: {e}")))?;
        if assigner.dim != dim {
            return Err(invalid(format!(
                "the stored clusterer has vectors of width {}, the job {dim}",
                assigner.dim
            )));
        }
        Ok(assigner)
    }

    pub fn snapshot(&self) -> Result<Vec<u8>, ClusterError> {
        bincode::serialize(self).map_err(invalid)
    }

    /// Whether the initial fit has run.
    pub fn fitted(&self) -> bool {
        matches!(self.phase, Phase::Streaming(_))
    }

    /// Assigns one epoch's documents (row order; `vectors` holds their unit vectors). The
    /// initial fit runs once the held documents reach `cluster.reservoir`, or at this epoch if
    /// `fit_now` (the last epoch of a job that has fewer documents). Returns what the epoch
    /// commits: its new members, the clusters that changed, and the state after it.
    pub fn assign_epoch(
        &mut self,
        epoch: u64,
        docs: &[DocMeta],
        vectors: &[f32],
        config: &ClusterConfig,
        seed: u64,
        fit_now: bool,
    ) -> Result<ClusterCommit, ClusterError> {
        if vectors.len() != docs.len() * self.dim {
            return Err(invalid(format!(
                "epoch {epoch}: {} vector values for {} documents of width {}",
                vectors.len(),
                docs.len(),
                self.dim
            )));
        }
        let new_members = docs.iter().map(|d| Member {
            cluster: 0,
            epoch,
            row_group: d.row_group,
            row: d.row,
            tokens: d.tokens,
            flags: 0,
        });
        let mut commit = ClusterCommit::default();
        match &mut self.phase {
            Phase::Warmup {
                members,
                vectors: held,
            } => {
                members.extend(new_members);
                held.extend_from_slice(vectors);
                if members.len() >= config.reservoir || (fit_now && !members.is_empty()) {
                    let members = std::mem::take(members);
                    let held = std::mem::take(held);
                    commit.members = self.fit(members, &held, config, seed)?;
                    let k = self.cluster_count() as u32;
                    commit.clusters = (0..k).map(|c| self.info(c)).collect();
                }
            }
            Phase::Streaming(clusterer) => {
                let assignments = clusterer.assign_batch(vectors);
                let mut touched = BTreeSet::new();
                for (mut member, a) in new_members.zip(assignments) {
                    member.cluster = a.cluster;
                    touched.insert(a.cluster);
                    commit.members.push(member);
                }
                for member in &commit.members {
                    self.count(member);
                }
                commit.clusters = touched.into_iter().map(|c| self.info(c)).collect();
            }
        }
        commit.state = self.snapshot()?;
        Ok(commit)
    }

    /// The initial fit on the held documents; they become the first members.
    fn fit(
        &mut self,
        mut members: Vec<Member>,
        vectors: &[f32],
        config: &ClusterConfig,
        seed: u64,
    ) -> Result<Vec<Member>, ClusterError> {
        let n = members.len();
        let k = config.k.min(n);
        let (backend, why) = KMeansBackend::from_setting(&config.backend, n, k, self.dim)?;
        let fit = fit_spherical_kmeans(
            vectors,
            self.dim,
            &KMeansConfig {
                k,
                max_iter: config.max_iter,
                tol: config.tol,
                seed,
                backend,
            },
        )?;
        tracing::info!(
            documents = n,
            k,
            iterations = fit.iterations,
            wcss = fit.wcss,
            backend = fit.backend_used,
            "initial clustering fit ({why})"
        );
        let clusterer = StreamingClusterer::new(fit.centroids, StreamConfig::from(config));
        for (member, &label) in members.iter_mut().zip(&fit.labels) {
            member.cluster = label;
        }
        for member in &members {
            self.count(member);
        }
        self.phase = Phase::Streaming(clusterer);
        Ok(members)
    }

    /// Clusters so far (0 before the initial fit).
    pub fn cluster_count(&self) -> usize {
        match &self.phase {
            Phase::Streaming(clusterer) => clusterer.centroids().k(),
            Phase::Warmup { .. } => 0,
        }
    }

    fn count(&mut self, member: &Member) {
        let c = member.cluster as usize;
        if self.sizes.len() <= c {
            self.sizes.resize(c + 1, 0);
            self.tokens.resize(c + 1, 0);
        }
        self.sizes[c] += 1;
        self.tokens[c] += u64::from(member.tokens);
    }

    fn info(&self, cluster: u32) -> ClusterInfo {
        let centroid = match &self.phase {
            Phase::Streaming(clusterer) => {
                let centroids = clusterer.centroids();
                let c = cluster as usize;
                if c < centroids.k() {
                    centroids.row(c).to_vec()
                } else {
                    Vec::new()
                }
            }
            Phase::Warmup { .. } => Vec::new(),
        };
        ClusterInfo {
            cluster,
            centroid,
            size: self.sizes.get(cluster as usize).copied().unwrap_or(0),
            tokens: self.tokens.get(cluster as usize).copied().unwrap_or(0),
            fresh: 0,
        }
    }
}
