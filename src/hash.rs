//! Seeded 64-bit mixing shared by the filters, MinHash parameters and reservoir slots.

/// A 64-bit mix (splitmix64's finaliser): spreads a key over all bits. Also the seeded
/// hashes of `dedup` (MinHash parameters) and `bandit::scale` (reservoir slots).
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A `Hasher` for maps keyed by integers that are hashes already or row numbers: one `mix` a
/// key instead of SipHash's rounds, which cost more than the rest of a dedup decision's map
/// work. Not for keys an adversary picks to collide: the keys here are xxh3 hashes of texts.
#[derive(Default, Clone, Copy)]
pub struct MixHasher(u64);

impl std::hash::Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = mix(self.0 ^ x);
    }
}

/// `HashMap<K, V, MixedKeys>`: see `MixHasher`.
pub type MixedKeys = std::hash::BuildHasherDefault<MixHasher>;
