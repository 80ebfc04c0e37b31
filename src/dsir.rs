//! DSIR, data selection with importance resampling (Xie et al. 2023), the `dsir` strategy's
//! weights: documents are bags of hashed n-gram features (lowercased whitespace words, their
//! unigrams and bigrams hashed into `BUCKETS` buckets), the reference set and the pool are each
//! a bag-of-features distribution (counts with add-one smoothing), and a document's log
//! importance weight is the sum over its features of log(p_ref(b) / p_pool(b)).
//!
//! The weights are fitted once per job, from `influence.reference` against the first
//! `select.dsir_pool_docs` pool documents in shard order, and kept in the state store, so a
//! resumed job (new shards included) weighs with the same ones. The read stage computes each
//! document's log weight (`DocMeta::dsir_log_weight`) where its shard is read; the admit stage
//! resamples (`select::Admitter`, Gumbel top-k).
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Hashed feature buckets (the paper's 10,000).
pub const BUCKETS: usize = 10_000;

/// The key of the fitted weights in the store's run table.
pub const STORE_KEY: &str = "dsir_weights";

/// The bucket of every feature of a text, unigrams then bigrams, in text order.
pub fn features(text: &str, mut f: impl FnMut(usize)) {
    let mut previous: Option<u64> = None;
    let mut word = String::new();
    for token in text.split_whitespace() {
        word.clear();
        word.extend(token.chars().flat_map(char::to_lowercase));
        let h = xxh3_64(word.as_bytes());
        f((h % BUCKETS as u64) as usize);
        if let Some(p) = previous {
            // A bigram's hash: the ordered pair of its words' hashes, mixed.
            let pair = crate::hash::mix(p.rotate_left(17) ^ h.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            f((pair % BUCKETS as u64) as usize);
        }
        previous = Some(h);
    }
}

/// Feature counts of a set of texts, smoothed into log probabilities.
fn log_distribution<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<f64> {
    let mut counts = vec![0u64; BUCKETS];
    for text in texts {
        features(text, |b| counts[b] += 1);
    }
    let total = counts.iter().sum::<u64>() as f64 + BUCKETS as f64;
    counts
        .iter()
        .map(|&c| ((c as f64 + 1.0) / total).ln())
        .collect()
}

/// The fitted log importance ratio of every bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct DsirWeights {
    log_ratio: Vec<f64>,
}

/// How the weights are stored: the bits of each f64, so a resumed job has the very same.
#[derive(Serialize, Deserialize)]
struct StoredWeights {
    buckets: usize,
    bits: Vec<u64>,
}

impl DsirWeights {
    /// log(p_ref / p_pool) per bucket, both add-one smoothed.
    pub fn fit<'a>(
        reference: impl IntoIterator<Item = &'a str>,
        pool: impl IntoIterator<Item = &'a str>,
    ) -> DsirWeights {
        let reference = log_distribution(reference);
        let pool = log_distribution(pool);
        DsirWeights {
            log_ratio: reference.iter().zip(&pool).map(|(r, p)| r - p).collect(),
        }
    }

    /// A document's log importance weight: the sum of its features' log ratios.
    pub fn log_weight(&self, text: &str) -> f64 {
        let mut sum = 0.0;
        features(text, |b| sum += self.log_ratio[b]);
        sum
    }

    /// The weights as the store keeps them (JSON of the f64 bits).
    pub fn to_stored(&self) -> serde_json::Value {
        serde_json::json!(StoredWeights {
            buckets: BUCKETS,
            bits: self.log_ratio.iter().map(|w| w.to_bits()).collect(),
        })
    }

    /// The weights a store kept, or why they cannot be used.
    pub fn from_stored(value: serde_json::Value) -> Result<DsirWeights, String> {
        let stored: StoredWeights =
            serde_json::from_value(value).map_err(|e| format!("stored DSIR weights: {e}"))?;
        if stored.buckets != BUCKETS || stored.bits.len() != BUCKETS {
            return Err(format!(
                "stored DSIR weights have {} buckets, this build uses {BUCKETS}",
                stored.bits.len()
            ));
        }
        Ok(DsirWeights {
            log_ratio: stored.bits.into_iter().map(f64::from_bits).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_like_texts_weigh_more_and_weights_survive_the_store() {
        let reference = [
            "the match ended with a late goal",
            "a goal in the final match",
        ];
        let pool = [
            "the match ended with a late goal",
            "the recipe needs flour and butter",
            "bake the butter cake for an hour",
        ];
        let w = DsirWeights::fit(reference, pool);
        assert!(w.log_weight("a late goal in the match") > w.log_weight("flour butter cake"));
        assert_eq!(w.log_weight(""), 0.0);
        assert_eq!(w.log_weight("Goal MATCH"), w.log_weight("goal match"));
        let back = DsirWeights::from_stored(w.to_stored()).unwrap();
        assert_eq!(back, w);
        let mut n = 0;
        features("a b c", |_| n += 1);
        assert_eq!(n, 5, "three unigrams and two bigrams");
    }
}
