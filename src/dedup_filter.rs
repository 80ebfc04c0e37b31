//! A bounded in-memory filter in front of the store's dedup lookups: a blocked Bloom filter
//! over the ids' 128-bit keys (`state::id_key`). "Absent" is certain, so the common case (a
//! new id) needs no B-tree read; "maybe present" sends the id to the store, which decides.
//!
//! It grows with the keys up to a bound fixed when it is made, whatever the pool (a scalable
//! Bloom filter, Almeida et al. 2007): slices of doubling size, a key inserted into the
//! newest, looked up in all. A small job so touches a small filter (every page of a filter is
//! written within its first few thousand keys, so a filter made at its bound would cost a
//! small job the zeroing of all of it), a large one the bound. Past the bound the last slice
//! fills up: it answers "maybe" more often and the job reads the store more, it never drops
//! a new document.
//!
//! Blocked (Putze, Sanders, Singler 2007): all of a key's bits fall in one 64-byte block, so a
//! lookup touches one cache line a slice.
use crate::hash::mix;

/// Bits set per key, all in one block.
const BITS_PER_KEY: u32 = 8;
/// 512 bits, one cache line.
const BLOCK_WORDS: usize = 8;
const BLOCK_BYTES: usize = BLOCK_WORDS * 8;
/// A slice is full at this many bits a key (about 1% false positives with 8 bits set a key).
const CAPACITY_BITS_PER_KEY: usize = 10;
/// The first slice's size: 840,000 keys.
const FIRST_SLICE_BYTES: usize = 1 << 20;

pub struct DedupFilter {
    /// Oldest first; each twice the size of the one before.
    slices: Vec<Slice>,
    /// The most all slices together may take.
    max_bytes: usize,
    seed: u64,
}

/// One blocked Bloom filter and the keys inserted into it.
struct Slice {
    blocks: Vec<[u64; BLOCK_WORDS]>,
    keys: usize,
}

impl Slice {
    fn new(bytes: usize) -> Slice {
        let blocks = (bytes / BLOCK_BYTES).max(1);
        let slice = Slice {
            blocks: vec![[0u64; BLOCK_WORDS]; blocks],
            keys: 0,
        };
        slice.advise_huge_pages();
        slice
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    fn full(&self) -> bool {
        self.keys * CAPACITY_BITS_PER_KEY >= self.bytes() * 8
    }

    /// Asks the kernel for 2 MiB pages under the slice: keys land in random blocks, so with 4
    /// KiB pages a 64 MiB slice takes 16,384 page faults within its first few thousand keys and
    /// misses the TLB on almost every lookup; 2 MiB pages make that 32 faults. Only advice:
    /// the filter works the same without it (another OS, transparent huge pages off).
    fn advise_huge_pages(&self) {
        const HUGE_PAGE: usize = 2 << 20;
        let start = self.blocks.as_ptr() as usize;
        let end = start + self.bytes();
        let (first, last) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        #[cfg(target_os = "linux")]
        if first < last {
            // SAFETY: [first, last) lies inside the slice's own allocation, which outlives
            // the call; MADV_HUGEPAGE changes neither its contents nor its mapping.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
        let _ = (first, last);
    }
}

impl DedupFilter {
    /// A filter of at most `bytes` bytes (at least one block); `seed` varies the bit positions.
    pub fn new(bytes: usize, seed: u64) -> DedupFilter {
        DedupFilter::growing(bytes, FIRST_SLICE_BYTES, seed)
    }

    /// A filter of at most `max_bytes` whose first slice has `first_bytes` (or `max_bytes`
    /// when less).
    fn growing(max_bytes: usize, first_bytes: usize, seed: u64) -> DedupFilter {
        let max_bytes = max_bytes.max(BLOCK_BYTES);
        DedupFilter {
            slices: vec![Slice::new(first_bytes.min(max_bytes))],
            max_bytes,
            seed,
        }
    }

    /// The bytes the filter holds now (at most the bound it was made with).
    pub fn bytes(&self) -> usize {
        self.slices.iter().map(Slice::bytes).sum()
    }

    pub fn insert(&mut self, key: u128) {
        self.insert_all(&[key]);
    }

    /// Inserts `keys`, each block fetched a few keys ahead: in a filter larger than the cache
    /// a key's block is a miss, and a key at a time the misses would come one after another.
    pub fn insert_all(&mut self, keys: &[u128]) {
        for (i, &key) in keys.iter().enumerate() {
            let newest = self.slices.last().expect("a filter has a slice");
            let next = 2 * newest.bytes();
            if newest.full() && self.bytes() + next <= self.max_bytes {
                self.slices.push(Slice::new(next));
            }
            let slice = self.slices.last_mut().expect("a filter has a slice");
            if let Some(&ahead) = keys.get(i + LOOK_AHEAD) {
                slice.prefetch(self.seed, ahead);
            }
            let (block, bits) = positions(self.seed, slice.blocks.len(), key);
            let words = &mut slice.blocks[block];
            for (word, bit) in bits {
                words[word] |= 1 << bit;
            }
            slice.keys += 1;
        }
    }

    /// False: the key was never inserted. True: it may have been.
    pub fn may_contain(&self, key: u128) -> bool {
        // Newest first: the largest slice holds most keys.
        self.slices
            .iter()
            .rev()
            .any(|slice| slice.holds(self.seed, key))
    }

    /// `may_contain` of each key, the blocks fetched a few keys ahead (as `insert_all`).
    pub fn may_contain_all(&self, keys: &[u128]) -> Vec<bool> {
        keys.iter()
            .enumerate()
            .map(|(i, &key)| {
                if let Some(&ahead) = keys.get(i + LOOK_AHEAD) {
                    self.slices
                        .iter()
                        .for_each(|s| s.prefetch(self.seed, ahead));
                }
                self.may_contain(key)
            })
            .collect()
    }
}

/// How many keys ahead a batch fetches blocks: enough misses in flight to cover a memory
/// access with the work of the keys between.
const LOOK_AHEAD: usize = 8;

impl Slice {
    fn holds(&self, seed: u64, key: u128) -> bool {
        let (block, bits) = positions(seed, self.blocks.len(), key);
        let words = &self.blocks[block];
        bits.iter()
            .all(|&(word, bit)| words[word] & (1 << bit) != 0)
    }

    /// Asks the CPU to fetch the block of `key` into the cache (a hint: nothing else changes).
    fn prefetch(&self, seed: u64, key: u128) {
        let block = block_index(seed, self.blocks.len(), key);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: SSE is part of every x86-64 CPU; a prefetch reads nothing and the
            // address lies in the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.blocks[block].as_ptr().cast()) };
        }
        let _ = block;
    }
}

/// The block among `blocks` that `key`'s bits fall in.
fn block_index(seed: u64, blocks: usize, key: u128) -> usize {
    reduce(mix(key as u64 ^ seed), blocks)
}

/// Lemire's reduction of a mixed value to an index below `n`: unbiased enough, no division.
fn reduce(mixed: u64, n: usize) -> usize {
    ((u128::from(mixed) * n as u128) >> 64) as usize
}

/// The key's block among `blocks` and the bits it sets there (word index, bit), derived from
/// the key.
fn positions(
    seed: u64,
    blocks: usize,
    key: u128,
) -> (usize, [(usize, u32); BITS_PER_KEY as usize]) {
    let low = mix(key as u64 ^ seed);
    // Mixed with `low` too: an id key has 96 bits, so the high word holds only 32 of them.
    let high = mix((key >> 64) as u64 ^ seed.rotate_left(32) ^ low);
    let block = reduce(low, blocks);
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
        let blocks = (1 << 20) / BLOCK_BYTES;
        assert_ne!(positions(1, blocks, key), positions(2, blocks, key));
    }

    #[test]
    fn the_filter_grows_with_its_keys_up_to_its_bound() {
        let (max, first) = (1 << 20, 64 << 10);
        let mut filter = DedupFilter::growing(max, first, 5);
        let key = |i: usize| id_key(&format!("doc-{i}"));
        // A small pool keeps the first slice only.
        (0..1_000).for_each(|i| filter.insert(key(i)));
        assert_eq!(filter.bytes(), first);
        // 64 KiB holds 52,428 keys at 10 bits a key; then 128, 256 and 512 KiB slices follow,
        // and 1 MiB would pass the bound: the 512 KiB slice takes every key from then on.
        let n = 1_500_000;
        (1_000..n).for_each(|i| filter.insert(key(i)));
        assert_eq!(filter.slices.len(), 4);
        assert_eq!(filter.bytes(), (64 + 128 + 256 + 512) << 10);
        assert!(filter.bytes() <= max);
        assert!((0..n).step_by(7).all(|i| filter.may_contain(key(i))));
        // Below the bound, the slices' false positives add up: about 1% each when full.
        let mut below = DedupFilter::growing(max, first, 5);
        let m = 350_000;
        (0..m).for_each(|i| below.insert(key(i)));
        assert_eq!(below.slices.len(), 3);
        let false_positives = (m..m + 100_000)
            .filter(|&i| below.may_contain(key(i)))
            .count();
        let rate = false_positives as f64 / 100_000.0;
        assert!(rate < 0.04, "false positive rate {rate} over 3 slices");
    }

    #[test]
    fn batches_answer_as_keys_one_at_a_time() {
        // Across slices: the batch grows the filter where single inserts would.
        let key = |i: usize| id_key(&format!("doc-{i}"));
        let keys: Vec<u128> = (0..200_000).map(key).collect();
        let (mut single, mut batched) = (
            DedupFilter::growing(1 << 20, 16 << 10, 9),
            DedupFilter::growing(1 << 20, 16 << 10, 9),
        );
        keys.iter().for_each(|&k| single.insert(k));
        for chunk in keys.chunks(7_919) {
            batched.insert_all(chunk);
        }
        assert!(batched.slices.len() > 1);
        assert_eq!(single.bytes(), batched.bytes());
        let probes: Vec<u128> = (100_000..300_000).map(key).collect();
        let one_by_one: Vec<bool> = probes.iter().map(|&k| single.may_contain(k)).collect();
        assert_eq!(batched.may_contain_all(&probes), one_by_one);
        assert!(one_by_one[..100_000].iter().all(|&maybe| maybe));
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
