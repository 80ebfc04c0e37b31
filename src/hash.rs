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
