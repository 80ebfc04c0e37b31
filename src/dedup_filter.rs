//! A bounded in-memory filter in front of the store's dedup lookups: a blocked Bloom filter
//! over the ids' 128-bit keys (`state::id_key`). "Absent" is certain, so the common case (a
//! new id) needs no B-tree read; "maybe present" sends the id to the store, which decides. Its
//! size is fixed when it is made, whatever the pool: past its capacity it answers "maybe" more
//! often and the job reads the store more, it never drops a new document.
//!
//! Blocked (Putze, Sanders, Singler 2007): all of a key's bits fall in one 64-byte block, so a
//! lookup touches one cache line.
use crate::hash::mix;

/// Bits set per key, all in one block.
const BITS_PER_KEY: u32 = 8;
/// 512 bits, one cache line.
const BLOCK_WORDS: usize = 8;
const BLOCK_BYTES: usize = BLOCK_WORDS * 8;

pub struct DedupFilter {
    blocks: Vec<[u64; BLOCK_WORDS]>,
    seed: u64,
}

impl DedupFilter {
    /// A filter of at most `bytes` bytes (at least one block); `seed` varies the bit positions.
    pub fn new(bytes: usize, seed: u64) -> DedupFilter {
        let blocks = (bytes / BLOCK_BYTES).max(1);
        DedupFilter {
            blocks: vec![[0u64; BLOCK_WORDS]; blocks],
            seed,
        }
    }

    /// The filter's size in bytes.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    /// The key's block and the bits it sets there (word index, bit), derived from the key.
    fn positions(&self, key: u128) -> (usize, [(usize, u32); BITS_PER_KEY as usize]) {
        let low = mix(key as u64 ^ self.seed);
        // Mixed with `low` too: an id key has 96 bits, so the high word holds only 32 of them.
        let high = mix((key >> 64) as u64 ^ self.seed.rotate_left(32) ^ low);
        // Lemire's reduction: an unbiased enough block index without a division.
        let block = ((u128::from(low) * self.blocks.len() as u128) >> 64) as usize;
        let mut bits = [(0usize, 0u32); BITS_PER_KEY as usize];
        // Each position takes 9 bits of `high` (word 3 bits, bit 6 bits): 8 x 9 = 72 > 64, so
        // the last ones reuse bits of `low` that the block index did not use.
        let mut pool = u128::from(high) | (u128::from(low as u32) << 64);
        for slot in bits.iter_mut() {
            *slot = ((pool & 7) as usize, ((pool >> 3) & 63) as u32);
            pool >>= 9;
        }
        (block, bits)
    }

    pub fn insert(&mut self, key: u128) {
        let (block, bits) = self.positions(key);
        let words = &mut self.blocks[block];
        for (word, bit) in bits {
            words[word] |= 1 << bit;
        }
    }

    /// False: the key was never inserted. True: it may have been.
    pub fn may_contain(&self, key: u128) -> bool {
        let (block, bits) = self.positions(key);
        let words = &self.blocks[block];
        bits.iter()
            .all(|&(word, bit)| words[word] & (1 << bit) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::id_key;

    #[test]
    fn inserted_keys_are_always_found_and_new_ones_rarely() {
        // 10 bits per key: a blocked filter with 8 bits a key gives about 1% false positives.
        let n = 100_000;
        let mut filter = DedupFilter::new(n * 10 / 8, 7);
        for i in 0..n {
            filter.insert(id_key(&format!("doc-{i}")));
        }
        assert!((0..n).all(|i| filter.may_contain(id_key(&format!("doc-{i}")))));
        let false_positives = (n..2 * n)
            .filter(|i| filter.may_contain(id_key(&format!("doc-{i}"))))
            .count();
        let rate = false_positives as f64 / n as f64;
        assert!(rate < 0.03, "false positive rate {rate}");
    }

    #[test]
    fn size_is_bounded_and_the_seed_moves_the_bits() {
        let filter = DedupFilter::new(1 << 20, 1);
        assert_eq!(filter.bytes(), 1 << 20);
        assert_eq!(DedupFilter::new(0, 1).bytes(), BLOCK_BYTES);
        let key = id_key("a");
        assert_ne!(
            DedupFilter::new(1 << 20, 1).positions(key),
            DedupFilter::new(1 << 20, 2).positions(key)
        );
    }

    #[test]
    fn an_overfull_filter_still_finds_every_key() {
        let mut filter = DedupFilter::new(64, 3);
        for i in 0..10_000 {
            filter.insert(id_key(&i.to_string()));
        }
        assert!((0..10_000).all(|i| filter.may_contain(id_key(&i.to_string()))));
    }
}
