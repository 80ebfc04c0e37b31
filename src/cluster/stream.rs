//! Streaming assignment (DESIGN 1.1, step 3): every new document goes to its nearest centroid;
//! a document whose best cosine is under the floor opens a new cluster while k < k_max; after
//! each batch the centroids move by Sculley's mini-batch update (Sculley, "Web-scale k-means
//! clustering", WWW 2010: per-centroid count v, learning rate 1/v) and are re-normalised.
use serde::{Deserialize, Serialize};
use tch::Device;

use super::ClusterConfig;
use super::{dot_exact, nearest_rows, normalize, Centroids};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Never more clusters than this (opening stops there).
    pub k_max: usize,
    /// Open a cluster when the best cosine is below this and k < k_max.
    pub new_cluster_floor: f32,
    /// Lower bound on the learning rate (0 = Sculley's 1/count, a running mean). A positive
    /// floor keeps old centroids following a drifting stream.
    pub learning_rate_floor: f64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            k_max: 128,
            new_cluster_floor: 0.2,
            learning_rate_floor: 0.0,
        }
    }
}

impl From<&ClusterConfig> for StreamConfig {
    fn from(c: &ClusterConfig) -> Self {
        StreamConfig {
            k_max: c.k_max,
            new_cluster_floor: c.new_cluster_floor,
            learning_rate_floor: c.learning_rate_floor,
        }
    }
}

/// Where one document went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub cluster: u32,
    /// Cosine with the cluster's centroid as it was when the document was assigned.
    pub cosine: f32,
    /// The document opened this cluster.
    pub opened: bool,
}

fn cpu() -> Device {
    Device::Cpu
}

/// The streaming clusterer. Its serialised form is its whole state: a stored clusterer
/// resumes exactly (the device is a run-time choice and is not stored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamingClusterer {
    centroids: Centroids,
    config: StreamConfig,
    #[serde(skip, default = "cpu")]
    device: Device,
}

impl StreamingClusterer {
    pub fn new(initial: Centroids, cfg: StreamConfig) -> Self {
        StreamingClusterer {
            centroids: initial,
            config: cfg,
            device: Device::Cpu,
        }
    }

    /// Runs the nearest-centroid matrix products on `device` (results are the same on any).
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    pub fn centroids(&self) -> &Centroids {
        &self.centroids
    }

    /// Nearest centroid and cosine of each row of `x` (row-major, width `dim`); no change.
    pub fn nearest(&self, x: &[f32]) -> Vec<(u32, f32)> {
        nearest_rows(x, self.centroids.dim, &self.centroids.data, self.device)
    }

    /// Assigns the rows of `x` (unit vectors, width `dim`) in input order, opening clusters as
    /// the floor says, then applies the mini-batch update. Deterministic for a given state and
    /// input; independent of the device and thread count.
    pub fn assign_batch(&mut self, x: &[f32]) -> Vec<Assignment> {
        let dim = self.centroids.dim;
        let near = self.nearest(x);
        let first_opened = self.centroids.k();
        let mut out = Vec::with_capacity(near.len());
        for (row, &(best, cos)) in x.chunks_exact(dim).zip(&near) {
            // Clusters opened earlier in this batch are not in the matrix product: check them.
            let (mut cluster, mut cosine) = (best as usize, f64::from(cos));
            for c in first_opened..self.centroids.k() {
                let d = dot_exact(row, self.centroids.row(c));
                if d > cosine {
                    (cluster, cosine) = (c, d);
                }
            }
            let opened = cosine < f64::from(self.config.new_cluster_floor)
                && self.centroids.k() < self.config.k_max;
            if opened {
                // Count 0: the update below makes it exactly this document (rate 1/1).
                cluster = self.centroids.k();
                cosine = dot_exact(row, row);
                self.centroids.data.extend_from_slice(row);
                self.centroids.counts.push(0);
            }
            out.push(Assignment {
                cluster: cluster as u32,
                cosine: cosine as f32,
                opened,
            });
        }
        self.update(x, &out);
        out
    }

    /// Assigns the rows of `x` to their nearest existing centroid (no cluster opens), then
    /// applies the mini-batch update: how the documents held for the initial fit join the
    /// fitted clusters, all against the same centroids, as the fit's own labels would.
    pub fn assign_to_fitted(&mut self, x: &[f32]) -> Vec<Assignment> {
        let out: Vec<Assignment> = self
            .nearest(x)
            .into_iter()
            .map(|(cluster, cosine)| Assignment {
                cluster,
                cosine,
                opened: false,
            })
            .collect();
        self.update(x, &out);
        out
    }

    /// Sculley's update in input order, then the moved centroids are re-normalised.
    fn update(&mut self, x: &[f32], assigned: &[Assignment]) {
        let dim = self.centroids.dim;
        let mut moved = vec![false; self.centroids.k()];
        for (row, a) in x.chunks_exact(dim).zip(assigned) {
            let c = a.cluster as usize;
            self.centroids.counts[c] += 1;
            let rate = (1.0 / self.centroids.counts[c] as f64).max(self.config.learning_rate_floor);
            for (v, xv) in self.centroids.data[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(row)
            {
                *v = (f64::from(*v) + rate * (f64::from(*xv) - f64::from(*v))) as f32;
            }
            moved[c] = true;
        }
        for (c, m) in moved.into_iter().enumerate() {
            if m {
                normalize(&mut self.centroids.data[c * dim..(c + 1) * dim]);
            }
        }
    }
}
