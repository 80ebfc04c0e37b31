//! Duplicate texts: what a document's text is reduced to so that copies can be found in the
//! stream (`[dedup]`). Pure functions of the text and the settings, computed on the worker
//! that reads the shard (the expensive part: normalising, hashing, MinHash); the admit stage
//! (`select::text_dedup`) only compares these fingerprints with earlier documents'.
//!
//! - Exact: the text normalised (Unicode NFKC, lower case, runs of whitespace collapsed to one
//!   space, trimmed) and hashed (xxh3, 64 bits: a false duplicate needs about 2^32 documents
//!   a pool, and then both texts would be reported with the matched id).
//! - Near: MinHash over word n-grams (Broder 1997) with locality-sensitive banding, as
//!   FineWeb's datatrove does: `bands` x `rows` hash functions, a band is `rows` consecutive
//!   minima hashed into one key. Two documents of Jaccard similarity s share at least one band
//!   with probability 1 - (1 - s^rows)^bands (`band_match_probability`). A band match is then
//!   checked against `threshold` with a 1-byte-a-hash sketch (b-bit MinHash, Li and König
//!   2010), which is what the store keeps of a document.
use serde::{Deserialize, Serialize};
use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Exact and near-duplicate removal (`[dedup]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Reject a document whose normalised text equals an earlier document's.
    #[serde(default = "yes")]
    pub exact: bool,
    /// Reject a document whose estimated Jaccard similarity to an earlier kept document that
    /// shares one of its bands is at least `threshold`.
    #[serde(default = "yes")]
    pub near: bool,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Words a shingle (word n-gram).
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    #[serde(default = "default_bands")]
    pub bands: usize,
    /// Hash functions a band.
    #[serde(default = "default_rows")]
    pub rows: usize,
    /// Seeds the MinHash functions and the band keys.
    #[serde(default)]
    pub seed: u64,
}

fn yes() -> bool {
    true
}
fn default_threshold() -> f64 {
    0.8
}
fn default_ngram() -> usize {
    5
}
fn default_bands() -> usize {
    14
}
fn default_rows() -> usize {
    8
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            exact: true,
            near: true,
            threshold: default_threshold(),
            ngram: default_ngram(),
            bands: default_bands(),
            rows: default_rows(),
            seed: 0,
        }
    }
}

/// Bands are numbered in the key's top byte.
const MAX_BANDS: usize = 255;
/// Hash functions at most (bands x rows): a sketch is this many bytes a kept document.
const MAX_HASHES: usize = 1024;

impl DedupConfig {
    pub fn validate(&self) -> Result<(), String> {
        let threshold_ok = self.threshold > 0.0 && self.threshold <= 1.0;
        let sizes_ok = self.ngram > 0 && self.rows > 0 && self.bands > 0;
        let bounded = self.bands <= MAX_BANDS && self.hashes() <= MAX_HASHES;
        match (threshold_ok, sizes_ok, bounded) {
            (false, _, _) => Err(format!(
                "dedup.threshold must be in (0, 1], got {}",
                self.threshold
            )),
            (_, false, _) => {
                Err("dedup.ngram, dedup.bands and dedup.rows must be at least 1".into())
            }
            (_, _, false) => Err(format!(
                "dedup: at most {MAX_BANDS} bands and {MAX_HASHES} hash functions \
                 (bands x rows), got {} x {}",
                self.bands, self.rows
            )),
            _ => Ok(()),
        }
    }

    /// Whether documents need a fingerprint at all.
    pub fn enabled(&self) -> bool {
        self.exact || self.near
    }

    pub fn hashes(&self) -> usize {
        self.bands * self.rows
    }
}

/// What the admit stage compares of a document's text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Hash of the normalised text (`text_hash`).
    pub text: u64,
    /// One key a band (`band_keys`); empty when near dedup is off.
    pub bands: Vec<u64>,
    /// The low byte of each MinHash value (`sketch`); empty when near dedup is off.
    pub sketch: Vec<u8>,
}

/// The text as it is compared: NFKC, lower case, whitespace runs as one space, trimmed.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    normalise_words(text, &mut out, |_| ());
    out
}

/// `normalise` into `out` (cleared first), calling `word` with each word of the result as it
/// is written, so that near dedup hashes the words without a second pass over the text.
///
/// Computed a piece at a time between ASCII whitespace, which is a normalisation boundary
/// (a starter that composes with nothing, so nothing reorders or composes across it): the
/// ASCII pieces, most of web text, are copied and lowercased as they are and skip the NFKC
/// machinery, and so are the other pieces that NFKC's quick check says it leaves unchanged
/// (curly quotes, dashes, accented letters already composed). The result is that of the
/// whole text normalised.
pub fn normalise_words(text: &str, out: &mut String, mut word: impl FnMut(&str)) {
    out.clear();
    if text.is_ascii() {
        normalise_ascii(text.as_bytes(), out, &mut word);
        return;
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        if is_ascii_space(bytes[at]) {
            at += 1;
            continue;
        }
        let start = at;
        let mut ascii = true;
        while at < bytes.len() && !is_ascii_space(bytes[at]) {
            ascii &= bytes[at].is_ascii();
            at += 1;
        }
        // An ASCII byte is never part of a longer character, so `start` and `at` are
        // character boundaries.
        let piece = &text[start..at];
        if ascii {
            let from = begin_word(out);
            out.push_str(piece);
            out[from..].make_ascii_lowercase();
            word(&out[from..]);
        } else if is_nfkc_quick(piece.chars()) == IsNormalized::Yes && !piece.contains('Σ') {
            // Lower case a character at a time, as `str::to_lowercase` does but for the
            // final sigma, whose context rule the slow path keeps.
            lowercase_words(piece.chars(), out, &mut word);
        } else {
            let folded = piece.nfkc().collect::<String>().to_lowercase();
            // NFKC may make whitespace (a no-break space becomes a space): split again.
            for w in folded.split_whitespace() {
                let from = begin_word(out);
                out.push_str(w);
                word(&out[from..]);
            }
        }
    }
}

/// `normalise_words` of a text that is ASCII throughout (most of web text), which NFKC leaves
/// as it is: one pass that lowercases the bytes as it copies them, with no work per piece.
fn normalise_ascii(bytes: &[u8], out: &mut String, word: &mut impl FnMut(&str)) {
    let mut buf = std::mem::take(out).into_bytes();
    buf.reserve(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if is_ascii_space(bytes[at]) {
            at += 1;
            continue;
        }
        if !buf.is_empty() {
            buf.push(b' ');
        }
        let from = buf.len();
        while at < bytes.len() && !is_ascii_space(bytes[at]) {
            buf.push(bytes[at].to_ascii_lowercase());
            at += 1;
        }
        // SAFETY: every byte written is ASCII, which is UTF-8.
        word(unsafe { std::str::from_utf8_unchecked(&buf[from..]) });
    }
    // SAFETY: as above.
    *out = unsafe { String::from_utf8_unchecked(buf) };
}

/// Separates the next word from the last one; where the next word starts in `out`.
fn begin_word(out: &mut String) -> usize {
    if !out.is_empty() {
        out.push(' ');
    }
    out.len()
}

/// Writes `chars` lowercased into `out`, its words (split at Unicode whitespace) separated by
/// one space, calling `word` with each.
fn lowercase_words(
    chars: impl Iterator<Item = char>,
    out: &mut String,
    word: &mut impl FnMut(&str),
) {
    let mut from: Option<usize> = None;
    for c in chars {
        if c.is_whitespace() {
            if let Some(f) = from.take() {
                word(&out[f..]);
            }
            continue;
        }
        if from.is_none() {
            from = Some(begin_word(out));
        }
        out.extend(c.to_lowercase());
    }
    if let Some(f) = from {
        word(&out[f..]);
    }
}

/// Unicode whitespace among the ASCII bytes (`is_ascii_whitespace` leaves out the vertical tab).
fn is_ascii_space(b: u8) -> bool {
    b.is_ascii_whitespace() || b == 0x0b
}

/// The exact-duplicate key of a normalised text.
pub fn text_hash(normalised: &str) -> u64 {
    xxh3_64(normalised.as_bytes())
}

/// A 64-bit mix (splitmix64): derives the hash functions' parameters from the seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    crate::hash::mix(*state)
}

/// The multiplier of `shingle_hashes`' polynomial: odd, so that a word's weight is never 0.
const SHINGLE_BASE: u64 = 0x9e37_79b9_7f4a_7c15;

/// The hash of each window of `width` consecutive word hashes: mix(sum_j w_j B^(width-1-j))
/// (mod 2^64), a polynomial in the words, so order matters, rolled from one window to the
/// next at a multiply-add or two a word instead of hashing every window's bytes again.
/// `mix` spreads the sum over all bits for the multiply-shift functions.
fn shingle_hashes(words: &[u64], width: usize) -> Vec<u64> {
    // B^(width-1): the weight of the word that leaves the window.
    let leaving = (1..width).fold(1u64, |p, _| p.wrapping_mul(SHINGLE_BASE));
    let mut sum = words[..width - 1]
        .iter()
        .fold(0u64, |h, &w| h.wrapping_mul(SHINGLE_BASE).wrapping_add(w));
    let mut hashes = Vec::with_capacity(words.len() + 1 - width);
    for (i, &w) in words.iter().enumerate().skip(width - 1) {
        sum = sum.wrapping_mul(SHINGLE_BASE).wrapping_add(w);
        hashes.push(crate::hash::mix(sum));
        // Drop the window's first word before the next one comes in.
        sum = sum.wrapping_sub(words[i + 1 - width].wrapping_mul(leaving));
    }
    hashes
}

/// The MinHash functions: h_i(x) = (a_i x + b_i) >> 32 on 64-bit shingle hashes, a_i odd
/// (multiply-shift, Dietzfelbinger et al.): one multiply-add a shingle and function.
pub struct MinHasher {
    /// The a_i, then the b_i, padded with functions nobody reads to a whole number of
    /// `FUNCTIONS_A_PASS`: apart, so that the inner loop reads two plain arrays and vectorises.
    multipliers: Vec<u64>,
    offsets: Vec<u64>,
    /// The functions asked for (the signature's length).
    hashes: usize,
    /// `block_minima` for this CPU, chosen once.
    minima: MinimaKernel,
    ngram: usize,
    rows: usize,
    seed: u64,
}

/// Hash functions computed in one pass over a document's shingles: their multipliers, offsets
/// and minima stay in registers (two 512-bit registers each on AVX-512) while the pass reads
/// the shingle hashes, so a shingle costs the arithmetic and no loads or stores of minima.
const FUNCTIONS_A_PASS: usize = 16;

/// The minimum of each hash function over `shingles`, `FUNCTIONS_A_PASS` functions a pass.
/// Inlined into each instruction-set version below.
#[inline(always)]
fn block_minima(minima: &mut [u32], multipliers: &[u64], offsets: &[u64], shingles: &[u64]) {
    let passes = multipliers
        .chunks_exact(FUNCTIONS_A_PASS)
        .zip(offsets.chunks_exact(FUNCTIONS_A_PASS));
    for (pass, (a, b)) in passes.enumerate() {
        let a: [u64; FUNCTIONS_A_PASS] = a.try_into().expect("whole passes");
        let b: [u64; FUNCTIONS_A_PASS] = b.try_into().expect("whole passes");
        // The values are below 2^32, so their minimum as signed 64-bit integers is theirs:
        // AVX2 compares 64-bit lanes signed only, and an unsigned minimum costs two more
        // instructions a vector (a third of the loop) to flip the sign bits.
        let mut lowest = [i64::MAX; FUNCTIONS_A_PASS];
        for &x in shingles {
            for i in 0..FUNCTIONS_A_PASS {
                let value = a[i].wrapping_mul(x).wrapping_add(b[i]) >> 32;
                lowest[i] = lowest[i].min(value as i64);
            }
        }
        let first = pass * FUNCTIONS_A_PASS;
        for (min, low) in minima[first..].iter_mut().zip(lowest) {
            *min = low as u32;
        }
    }
}

/// `block_minima` compiled for AVX-512 (eight 64-bit multiplies an instruction), which the
/// portable build cannot assume. The same arithmetic: the signature does not depend on the
/// CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn block_minima_avx512(minima: &mut [u32], multipliers: &[u64], offsets: &[u64], x: &[u64]) {
    block_minima(minima, multipliers, offsets, x)
}

/// `block_minima` compiled for AVX2 (four lanes; the 64-bit multiply in 32-bit pieces).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_minima_avx2(minima: &mut [u32], multipliers: &[u64], offsets: &[u64], x: &[u64]) {
    block_minima(minima, multipliers, offsets, x)
}

type MinimaKernel = fn(&mut [u32], &[u64], &[u64], &[u64]);

/// The widest `block_minima` this CPU runs.
fn minima_kernel() -> MinimaKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
            // SAFETY: the features `block_minima_avx512` is compiled for were just detected.
            return |m, a, b, x| unsafe { block_minima_avx512(m, a, b, x) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above, for AVX2.
            return |m, a, b, x| unsafe { block_minima_avx2(m, a, b, x) };
        }
    }
    block_minima
}

impl MinHasher {
    pub fn new(config: &DedupConfig) -> MinHasher {
        let mut state = config.seed;
        let hashes = config.hashes();
        let padded = hashes.div_ceil(FUNCTIONS_A_PASS) * FUNCTIONS_A_PASS;
        // The padding's functions come after the real ones, so these are the same whatever
        // the padding.
        let (multipliers, offsets) = (0..padded)
            .map(|_| (splitmix(&mut state) | 1, splitmix(&mut state)))
            .unzip();
        MinHasher {
            multipliers,
            offsets,
            hashes,
            minima: minima_kernel(),
            ngram: config.ngram,
            rows: config.rows,
            seed: config.seed,
        }
    }

    /// The minimum of each hash function over the text's word n-grams (a text of fewer words
    /// is one shingle).
    pub fn signature(&self, normalised: &str) -> Vec<u32> {
        // Split on the byte: words are a few bytes long, too short for `str::split`'s
        // memchr to pay off.
        let words: Vec<u64> = normalised
            .as_bytes()
            .split(|&b| b == b' ')
            .map(word_hash)
            .collect();
        self.signature_of_words(&words)
    }

    /// `signature` from the hashes (`word_hash`) of the normalised text's words.
    pub fn signature_of_words(&self, words: &[u64]) -> Vec<u32> {
        // The empty text is one empty word, as `signature` splits it.
        let empty = [word_hash(b"")];
        let words = if words.is_empty() { &empty[..] } else { words };
        let shingles = shingle_hashes(words, self.ngram.min(words.len()).max(1));
        let mut minima = vec![u32::MAX; self.multipliers.len()];
        (self.minima)(&mut minima, &self.multipliers, &self.offsets, &shingles);
        minima.truncate(self.hashes);
        minima
    }

    /// One key a band: its `rows` minima hashed, the band's number in the top byte (so keys
    /// of different bands never meet).
    pub fn band_keys(&self, signature: &[u32]) -> Vec<u64> {
        // One buffer for every band's bytes: a document has a dozen bands.
        let mut bytes = Vec::with_capacity(4 * self.rows);
        signature
            .chunks(self.rows)
            .enumerate()
            .map(|(band, minima)| {
                bytes.clear();
                bytes.extend(minima.iter().flat_map(|m| m.to_le_bytes()));
                let hash = xxh3_64_with_seed(&bytes, self.seed ^ band as u64);
                ((band as u64) << 56) | (hash >> 8)
            })
            .collect()
    }

    /// A document's fingerprint under `config` (near parts only when near dedup is on): one
    /// pass normalises the text and hashes its words.
    pub fn fingerprint(&self, config: &DedupConfig, text: &str) -> Fingerprint {
        let mut normalised = String::with_capacity(text.len());
        let mut words = Vec::new();
        if config.near {
            normalise_words(text, &mut normalised, |w| {
                words.push(word_hash(w.as_bytes()))
            });
        } else {
            normalise_words(text, &mut normalised, |_| ());
        }
        let mut fingerprint = Fingerprint {
            text: text_hash(&normalised),
            ..Default::default()
        };
        if config.near {
            let signature = self.signature_of_words(&words);
            fingerprint.bands = self.band_keys(&signature);
            fingerprint.sketch = sketch(&signature);
        }
        fingerprint
    }
}

/// A normalised word's hash, what shingles are made of.
pub fn word_hash(word: &[u8]) -> u64 {
    xxh3_64(word)
}

/// The low byte of each minimum (b-bit MinHash with b = 8).
pub fn sketch(signature: &[u32]) -> Vec<u8> {
    signature.iter().map(|&m| m as u8).collect()
}

/// The Jaccard similarity two sketches estimate. Two 8-bit values also agree by chance (1 in
/// 256) when the minima differ, so the fraction that agree, f, estimates s + (1 - s)/256 and
/// s = (f - 1/256) / (1 - 1/256).
pub fn estimated_jaccard(a: &[u8], b: &[u8]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    let agree = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    let chance = 1.0 / 256.0;
    ((agree - chance) / (1.0 - chance)).max(0.0)
}

/// The probability that two documents of Jaccard similarity `s` share at least one band.
pub fn band_match_probability(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

#[cfg(test)]
mod tests;
