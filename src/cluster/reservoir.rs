//! A seeded uniform sample of the first documents' vectors (Vitter's Algorithm R), which the
//! initial k-means fit runs on. The generator's position is part of the state, so a stored
//! reservoir resumes to exactly the sample an uninterrupted run would hold.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reservoir {
    capacity: usize,
    dim: usize,
    seed: u64,
    /// Vectors offered so far.
    seen: u64,
    /// Words of the ChaCha stream used so far (restored on deserialisation).
    word_pos: u64,
    data: Vec<f32>,
}

impl Reservoir {
    pub fn new(capacity: usize, dim: usize, seed: u64) -> Reservoir {
        Reservoir {
            capacity,
            dim,
            seed,
            seen: 0,
            word_pos: 0,
            data: Vec::with_capacity(capacity.min(1 << 20) * dim),
        }
    }

    /// Offers the rows of `x` (row-major, width `dim`) in order. Row i (counting every row
    /// ever offered) fills a free slot while there is one, then replaces slot j, j uniform in
    /// 0..=i, when j < capacity.
    pub fn offer(&mut self, x: &[f32]) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_word_pos(u128::from(self.word_pos));
        for row in x.chunks_exact(self.dim) {
            let i = self.seen;
            if (i as usize) < self.capacity {
                self.data.extend_from_slice(row);
            } else {
                let j = rng.random_range(0..=i);
                if (j as usize) < self.capacity {
                    let j = j as usize;
                    self.data[j * self.dim..(j + 1) * self.dim].copy_from_slice(row);
                }
            }
            self.seen += 1;
        }
        self.word_pos = rng.get_word_pos() as u64;
    }

    /// Rows held (at most the capacity).
    pub fn len(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Rows offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The sample, row-major.
    pub fn vectors(&self) -> &[f32] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<f32> {
        (0..n).flat_map(|i| [i as f32, 1.0]).collect()
    }

    #[test]
    fn resumes_exactly_and_samples_uniformly() {
        let x = rows(1000);
        let mut whole = Reservoir::new(50, 2, 7);
        whole.offer(&x);
        let mut parts = Reservoir::new(50, 2, 7);
        parts.offer(&x[..600]);
        let stored = serde_json::to_string(&parts).unwrap();
        let mut parts: Reservoir = serde_json::from_str(&stored).unwrap();
        parts.offer(&x[600..]);
        assert_eq!(whole.vectors(), parts.vectors());
        assert_eq!(whole.seen(), 1000);
        // Uniform: over many seeds each of 10 blocks of 100 rows holds about 10% of the sample.
        let mut per_block = [0usize; 10];
        for seed in 0..200 {
            let mut r = Reservoir::new(50, 2, seed);
            r.offer(&x);
            for row in r.vectors().chunks_exact(2) {
                per_block[row[0] as usize / 100] += 1;
            }
        }
        for count in per_block {
            // Expected 1000 per block; binomial sd about 30, so 850..1150 is 5 sd.
            assert!((850..=1150).contains(&count), "{per_block:?}");
        }
    }
}
