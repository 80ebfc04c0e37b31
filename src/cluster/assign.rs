//! The assign stage (DESIGN 1.1, step 3): the first `cluster.fit_window` documents, in epoch
//! (shard) and row order, are held until the initial spherical k-means fit, which runs on a
//! seeded uniform sample of `cluster.reservoir` of them (Algorithm R, so a window that spans
//! several shards is sampled evenly even when the shards are sorted); then the held documents
//! go to their nearest fitted centroid, and from then on every document goes to its nearest
//! centroid and centroids move by mini-batch updates, a far document opening a new cluster
//! while k < k_max.
//!
//! Documents must be given in epoch order and, within an epoch, in row order; the result then
//! depends only on the seed and the input, not on the number of workers. The whole state is
//! serialised after every epoch and committed with it, so a resumed job continues exactly.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::ClusterConfig;
use super::{
    fit_spherical_kmeans, KMeansBackend, KMeansConfig, Reservoir, StreamConfig, StreamingClusterer,
};
use crate::error::ClusterError;
use crate::source::DocMeta;
use crate::state::{ClusterCommit, ClusterInfo, Member};

#[derive(Debug, Serialize, Deserialize)]
enum Phase {
    /// Before the initial fit: the documents so far, their vectors (row-major) and the fit's
    /// sample of them.
    Warmup {
        members: Vec<Member>,
        vectors: Vec<f32>,
        sample: Option<Reservoir>,
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

/// Keeps the fit sample's random stream apart from the k-means seeding's (same job seed).
const FIT_SAMPLE_STREAM: u64 = 0x6b6d_6561_6e73_5f72;

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
                sample: None,
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
    /// initial fit runs once the held documents reach `cluster.fit_window`, or at this epoch if
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
                sample,
            } => {
                members.extend(new_members);
                held.extend_from_slice(vectors);
                let sample = sample.get_or_insert_with(|| {
                    Reservoir::new(config.reservoir, self.dim, seed ^ FIT_SAMPLE_STREAM)
                });
                sample.offer(vectors);
                if members.len() >= config.fit_window() || (fit_now && !members.is_empty()) {
                    let members = std::mem::take(members);
                    let held = std::mem::take(held);
                    let sample = sample.vectors().to_vec();
                    commit.members = self.fit(members, &held, &sample, config, seed)?;
                    commit.clusters = (0..self.cluster_count() as u32)
                        .map(|c| self.info(c))
                        .collect();
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

    /// The initial fit on the sample of the held documents; then the held documents go to
    /// their nearest fitted centroid (none opens a cluster: a document far from the sample's
    /// clusters would open one that only the held documents after it could join) and become
    /// the first members.
    fn fit(
        &mut self,
        mut members: Vec<Member>,
        vectors: &[f32],
        sample: &[f32],
        config: &ClusterConfig,
        seed: u64,
    ) -> Result<Vec<Member>, ClusterError> {
        let n = sample.len() / self.dim.max(1);
        let k = config.k.min(n);
        let (backend, why) = KMeansBackend::from_setting(&config.backend, n, k, self.dim)?;
        let fit = fit_spherical_kmeans(
            sample,
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
            documents = members.len(),
            sample = n,
            k,
            iterations = fit.iterations,
            wcss = fit.wcss,
            backend = fit.backend_used,
            "initial clustering fit ({why})"
        );
        let mut clusterer = StreamingClusterer::new(fit.centroids, StreamConfig::from(config));
        for (member, a) in members.iter_mut().zip(clusterer.assign_to_fitted(vectors)) {
            member.cluster = a.cluster;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` unit vectors of width 4 near axis `axis`, and their documents.
    fn shard(axis: usize, n: usize) -> (Vec<DocMeta>, Vec<f32>) {
        let mut vectors = Vec::new();
        let docs = (0..n)
            .map(|i| {
                let mut v = [0.05f32; 4];
                v[axis] = 1.0;
                v[(axis + 1) % 4] += 0.01 * (i % 7) as f32;
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                vectors.extend(v.iter().map(|x| x / norm));
                DocMeta {
                    row: i as u64,
                    row_group: 0,
                    id: format!("{axis}-{i}"),
                    tokens: 10,
                    fingerprint: None,
                    dsir_log_weight: None,
                }
            })
            .collect();
        (docs, vectors)
    }

    /// Shards sorted by domain: the first holds only domain A, the second only domain B. The
    /// initial fit samples the whole window, so it finds both (the first `reservoir` documents
    /// alone are all A).
    #[test]
    fn the_initial_fit_samples_the_whole_window_not_its_first_shard() {
        let config = ClusterConfig {
            k: 2,
            k_max: 2,
            reservoir: 40,
            fit_window: Some(200),
            new_cluster_floor: -1.0,
            backend: "linfa".into(),
            ..ClusterConfig::default()
        };
        let mut assigner = Assigner::new(4);
        let (a_docs, a_vectors) = shard(0, 100);
        let (b_docs, b_vectors) = shard(2, 100);
        let first = assigner
            .assign_epoch(0, &a_docs, &a_vectors, &config, 7, false)
            .unwrap();
        assert!(first.members.is_empty(), "held until the window is full");
        assert!(!assigner.fitted());
        let second = assigner
            .assign_epoch(1, &b_docs, &b_vectors, &config, 7, false)
            .unwrap();
        assert_eq!(second.members.len(), 200);
        let cluster_of = |epoch: u64| -> BTreeSet<u32> {
            second
                .members
                .iter()
                .filter(|m| m.epoch == epoch)
                .map(|m| m.cluster)
                .collect()
        };
        let (a, b) = (cluster_of(0), cluster_of(1));
        assert_eq!((a.len(), b.len()), (1, 1), "each domain is one cluster");
        assert_ne!(a, b, "the two domains are told apart");
        // The same input resumes to the same state from a snapshot taken while holding.
        let mut again = Assigner::new(4);
        again
            .assign_epoch(0, &a_docs, &a_vectors, &config, 7, false)
            .unwrap();
        let mut resumed = Assigner::restore(Some(&again.snapshot().unwrap()), 4).unwrap();
        let replay = resumed
            .assign_epoch(1, &b_docs, &b_vectors, &config, 7, false)
            .unwrap();
        assert_eq!(replay.members, second.members);
    }
}
