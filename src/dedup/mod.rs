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
    normalise_into(text, &mut out);
    out
}

/// `normalise` into `out` (cleared first).
fn normalise_into(text: &str, out: &mut String) {
    if text.is_ascii() {
        normalise_ascii(text.as_bytes(), out, None::<&mut fn(usize, usize)>);
    } else {
        normalise_words(text, out, |_, _| ());
    }
}

/// `normalise` into `out` (cleared first), calling `word` with where each word of the result
/// starts and ends in `out` as it is written, so that near dedup finds the words without a
/// second pass over the text.
///
/// Computed a piece at a time between ASCII whitespace, which is a normalisation boundary
/// (a starter that composes with nothing, so nothing reorders or composes across it): the
/// ASCII pieces, most of web text, are copied and lowercased as they are and skip the NFKC
/// machinery, and so are the other pieces that NFKC's quick check says it leaves unchanged
/// (curly quotes, dashes, accented letters already composed). The result is that of the
/// whole text normalised.
pub fn normalise_words(text: &str, out: &mut String, mut word: impl FnMut(usize, usize)) {
    out.clear();
    if text.is_ascii() {
        normalise_ascii(text.as_bytes(), out, Some(&mut word));
    } else {
        normalise_mixed(text, out, &mut word);
    }
}

/// `normalise_words` of a text with some non-ASCII bytes: in web text a few pieces among
/// hundreds (a dash, a curly quote, a mojibake sequence). The text's whitespace runs are
/// collapsed as for an ASCII text, without a branch a byte; then the pieces are taken a word
/// at a time, the ASCII ones lowercased in bulk and the others normalised one by one.
fn normalise_mixed(text: &str, out: &mut String, word: &mut impl FnMut(usize, usize)) {
    // Only ASCII whitespace becomes a space and only spaces are dropped, so what stays is the
    // text's pieces, whole, between single spaces: UTF-8 still.
    let mut pieces: Vec<u8> = text
        .as_bytes()
        .iter()
        .map(|&b| if is_ascii_space(b) { b' ' } else { b })
        .collect();
    let kept = drop_repeated_spaces(&mut pieces);
    pieces.truncate(kept);
    debug_assert!(std::str::from_utf8(&pieces).is_ok());
    // SAFETY: `text` is UTF-8, and replacing or removing ASCII bytes keeps UTF-8 UTF-8.
    let pieces = unsafe { String::from_utf8_unchecked(pieces) };
    // The ASCII pieces since the last other one, `pieces[run..]`, are copied in one go when
    // the next other piece (or the end) comes; their words go to `out` from `base` on.
    let mut run = 0;
    let mut base = 0;
    let flush = |out: &mut String, from: usize, to: usize| {
        if from < to {
            let at = begin_word(out);
            out.push_str(&pieces[from..to]);
            out[at..].make_ascii_lowercase();
        }
    };
    spaced_words(pieces.as_bytes(), &mut |start, end, ascii| {
        if ascii {
            word(base + start - run, base + end - run);
            return;
        }
        // The stretch before this piece ends with the space before it.
        flush(out, run, start.saturating_sub(1).max(run));
        normalise_piece(&pieces[start..end], out, word);
        run = end + 1;
        base = out.len() + usize::from(!out.is_empty());
    });
    flush(out, run.min(pieces.len()), pieces.len());
}

/// Normalises into `out` one piece between ASCII whitespace that is not ASCII, calling `word`
/// with each word it gives (none, one, or several where it holds other whitespace).
fn normalise_piece(piece: &str, out: &mut String, word: &mut impl FnMut(usize, usize)) {
    if is_nfkc_quick(piece.chars()) == IsNormalized::Yes && !piece.contains('Σ') {
        // Lower case a character at a time, as `str::to_lowercase` does but for the final
        // sigma, whose context rule the slow path keeps.
        lowercase_words(piece.chars(), out, word);
    } else {
        let folded = piece.nfkc().collect::<String>().to_lowercase();
        // NFKC may make whitespace (a no-break space becomes a space): split again.
        for w in folded.split_whitespace() {
            let from = begin_word(out);
            out.push_str(w);
            word(from, out.len());
        }
    }
}

/// `normalise_words` of a text that is ASCII throughout (most of web text), which NFKC leaves
/// as it is, in passes without a branch a byte: a copy that lowercases and turns each
/// whitespace byte into a space (it vectorises), then a compaction that drops a space after a
/// space, then (when `word` is given) the words between the spaces.
fn normalise_ascii<F: FnMut(usize, usize)>(bytes: &[u8], out: &mut String, word: Option<&mut F>) {
    let mut buf = std::mem::take(out).into_bytes();
    buf.clear();
    buf.extend(bytes.iter().map(|&b| {
        let upper = b.wrapping_sub(b'A') < 26;
        if is_ascii_space(b) {
            b' '
        } else {
            b | (u8::from(upper) << 5)
        }
    }));
    let kept = drop_repeated_spaces(&mut buf);
    buf.truncate(kept);
    if let Some(word) = word {
        ascii_words(&buf, word);
    }
    // SAFETY: every byte written is ASCII, which is UTF-8.
    *out = unsafe { String::from_utf8_unchecked(buf) };
}

/// Moves the bytes of `text` that are not a space after a space (or a space at the start or
/// the end) to its front, in order; how many there are. 64 bytes at a time: a block whose
/// spaces are all single (most of a text) moves whole, and one with a run of spaces moves the
/// stretches between the dropped spaces, found from the bit mask.
fn drop_repeated_spaces(text: &mut [u8]) -> usize {
    let mut kept = 0;
    // Whether the byte before the block is a space (a leading space is dropped too).
    let mut after_space = true;
    for start in (0..text.len()).step_by(64) {
        let length = (text.len() - start).min(64);
        let spaces = space_mask(&text[start..start + length]);
        let dropped = spaces & ((spaces << 1) | u64::from(after_space));
        after_space = spaces >> (length - 1) & 1 == 1;
        let mut keep = !dropped & (u64::MAX >> (64 - length));
        if keep == u64::MAX >> (64 - length) {
            if kept != start {
                text.copy_within(start..start + length, kept);
            }
            kept += length;
            continue;
        }
        while keep != 0 {
            let from = keep.trailing_zeros() as usize;
            let run = (keep >> from).trailing_ones() as usize;
            text.copy_within(start + from..start + from + run, kept);
            kept += run;
            // Clears the lowest run of ones: adding its lowest bit carries through it.
            keep &= keep.wrapping_add(keep & keep.wrapping_neg());
        }
    }
    if after_space && kept > 0 {
        kept -= 1;
    }
    kept
}

/// Bit i set where `block[i]` (at most 64 bytes) is a space.
fn space_mask(block: &[u8]) -> u64 {
    byte_masks(block).0
}

/// Bit i of the first set where `block[i]` (at most 64 bytes) is a space, of the second where it
/// is not ASCII.
fn byte_masks(block: &[u8]) -> (u64, u64) {
    if let Ok(whole) = <&[u8; 64]>::try_from(block) {
        return byte_masks_64(whole);
    }
    let mut padded = [0u8; 64];
    padded[..block.len()].copy_from_slice(block);
    byte_masks_64(&padded)
}

/// `byte_masks` of 64 bytes: four 16-byte compares and their sign bits on x86-64 (SSE2 is part
/// of it), a byte at a time elsewhere.
#[inline(always)]
fn byte_masks_64(block: &[u8; 64]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of every x86-64 CPU; unaligned loads of bytes 16q..16q+16 of
        // the 64.
        unsafe {
            let space = _mm_set1_epi8(b' ' as i8);
            let (mut spaces, mut other) = (0u64, 0u64);
            for quarter in 0..4 {
                let bytes = _mm_loadu_si128(block.as_ptr().add(16 * quarter).cast());
                let hits = _mm_movemask_epi8(_mm_cmpeq_epi8(bytes, space)) as u16;
                spaces |= u64::from(hits) << (16 * quarter);
                // The sign bit of each byte: set on the bytes of non-ASCII characters.
                other |= u64::from(_mm_movemask_epi8(bytes) as u16) << (16 * quarter);
            }
            (spaces, other)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        block
            .iter()
            .enumerate()
            .fold((0u64, 0u64), |(spaces, other), (i, &b)| {
                (
                    spaces | (u64::from(b == b' ') << i),
                    other | (u64::from(!b.is_ascii()) << i),
                )
            })
    }
}

/// Calls `word` with where each word of a normalised ASCII text (words separated by one space)
/// starts and ends.
fn ascii_words(text: &[u8], word: &mut impl FnMut(usize, usize)) {
    spaced_words(text, &mut |start, end, _| word(start, end));
}

/// Calls `word` with where each word of `text` (words separated by one space, none at either
/// end) starts and ends and whether it is ASCII, finding the spaces and the non-ASCII bytes 64
/// bytes at a time as bit masks: a branch a word, not a byte. Nothing for the empty text.
fn spaced_words(text: &[u8], word: &mut impl FnMut(usize, usize, bool)) {
    if text.is_empty() {
        return;
    }
    let mut start = 0;
    // Whether the word's bytes in earlier blocks hold a non-ASCII byte.
    let mut other_before = false;
    for (c, block) in text.chunks(64).enumerate() {
        let (mut spaces, other) = byte_masks(block);
        // The bits of the block from the word's start on.
        let mut from = 0u32;
        while spaces != 0 {
            let at = spaces.trailing_zeros();
            let within = (u64::MAX << from) & !(u64::MAX << at);
            let end = c * 64 + at as usize;
            word(start, end, !other_before && other & within == 0);
            (start, from, other_before) = (end + 1, at + 1, false);
            spaces &= spaces - 1;
        }
        other_before |= other.checked_shr(from).unwrap_or(0) != 0;
    }
    word(start, text.len(), !other_before);
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
    word: &mut impl FnMut(usize, usize),
) {
    let mut from: Option<usize> = None;
    for c in chars {
        if c.is_whitespace() {
            if let Some(f) = from.take() {
                word(f, out.len());
            }
            continue;
        }
        if from.is_none() {
            from = Some(begin_word(out));
        }
        out.extend(c.to_lowercase());
    }
    if let Some(f) = from {
        word(f, out.len());
    }
}

/// Unicode whitespace among the ASCII bytes (`is_ascii_whitespace` leaves out the vertical
/// tab): tab, line feed, vertical tab, form feed, carriage return (9 to 13) and the space, as
/// two compares so that the ASCII pass vectorises.
fn is_ascii_space(b: u8) -> bool {
    b.wrapping_sub(b'\t') < 5 || b == b' '
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

/// The high 32 bits of a 64-bit value (splitmix's best-mixed bits).
fn top_half(x: u64) -> u32 {
    (x >> 32) as u32
}

/// The multiplier of `shingle_hashes`' polynomial: odd, so that a word's weight is never 0.
const SHINGLE_BASE: u64 = 0x9e37_79b9_7f4a_7c15;

/// The hash of each window of `width` consecutive word hashes: the top 32 bits of
/// mix(sum_j w_j B^(width-1-j)) (mod 2^64), a polynomial in the words, so order matters, rolled
/// from one window to the next at a multiply-add or two a word instead of hashing every
/// window's bytes again. `mix` spreads the sum over all bits, so the 32 bits kept are uniform.
fn shingle_hashes(words: &[u64], width: usize, hashes: &mut Vec<u32>) {
    // B^(width-1): the weight of the word that leaves the window.
    let leaving = (1..width).fold(1u64, |p, _| p.wrapping_mul(SHINGLE_BASE));
    let mut sum = words[..width - 1]
        .iter()
        .fold(0u64, |h, &w| h.wrapping_mul(SHINGLE_BASE).wrapping_add(w));
    hashes.clear();
    hashes.reserve(words.len() + 1 - width);
    for (i, &w) in words.iter().enumerate().skip(width - 1) {
        sum = sum.wrapping_mul(SHINGLE_BASE).wrapping_add(w);
        hashes.push(top_half(crate::hash::mix(sum)));
        // Drop the window's first word before the next one comes in.
        sum = sum.wrapping_sub(words[i + 1 - width].wrapping_mul(leaving));
    }
}

/// The MinHash functions: h_i(x) = a_i x + b_i (mod 2^32) on 32-bit shingle hashes, a_i odd,
/// so each h_i is a permutation of the 32-bit values: the shingle hashes are uniform, so each
/// function's minimum falls on any shingle of a document with the same probability, and the
/// functions differ by a random affine map, which scatters one function's small values over
/// the whole range of another (`the_estimates_of_many_pairs_have_the_binomial_spread` checks
/// that the 112 agree like independent draws). 32-bit lanes: eight functions an AVX2
/// instruction, and a multiply, an add and an unsigned minimum a shingle and function.
pub struct MinHasher {
    /// The a_i, then the b_i, padded with functions nobody reads to a whole number of
    /// `FUNCTIONS_A_PASS`: apart, so that the inner loop reads two plain arrays and vectorises.
    multipliers: Vec<u32>,
    offsets: Vec<u32>,
    /// The functions asked for (the signature's length).
    hashes: usize,
    /// `block_minima` for this CPU, chosen once.
    minima: MinimaKernel,
    ngram: usize,
    rows: usize,
    seed: u64,
}

/// Hash functions computed in one pass over a document's shingles: their multipliers, offsets
/// and minima stay in registers (two 256-bit registers each) while the pass reads the
/// shingle hashes, so a shingle costs the arithmetic and no loads or stores of minima.
const FUNCTIONS_A_PASS: usize = 16;

/// The minimum of each hash function over `shingles`, `FUNCTIONS_A_PASS` functions a pass.
/// Portable: CPUs without AVX2 (and the definition `block_minima_avx2` is checked against).
fn block_minima(minima: &mut [u32], multipliers: &[u32], offsets: &[u32], shingles: &[u32]) {
    let passes = multipliers
        .chunks_exact(FUNCTIONS_A_PASS)
        .zip(offsets.chunks_exact(FUNCTIONS_A_PASS));
    for (pass, (a, b)) in passes.enumerate() {
        let a: [u32; FUNCTIONS_A_PASS] = a.try_into().expect("whole passes");
        let b: [u32; FUNCTIONS_A_PASS] = b.try_into().expect("whole passes");
        let mut lowest = [u32::MAX; FUNCTIONS_A_PASS];
        for &x in shingles {
            for i in 0..FUNCTIONS_A_PASS {
                lowest[i] = lowest[i].min(a[i].wrapping_mul(x).wrapping_add(b[i]));
            }
        }
        let first = pass * FUNCTIONS_A_PASS;
        minima[first..first + FUNCTIONS_A_PASS].copy_from_slice(&lowest);
    }
}

/// `block_minima` on AVX2: a pass's 16 multipliers, offsets and minima in six 256-bit
/// registers, a shingle broadcast to all lanes, then a multiply, an add and an unsigned minimum
/// for each eight functions (written out: compiled from the portable loop, the minima spilled
/// to the stack). The same arithmetic, so the signature does not depend on the CPU
/// (`the_avx2_kernel_equals_the_portable_one`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_minima_avx2(minima: &mut [u32], multipliers: &[u32], offsets: &[u32], x: &[u32]) {
    use std::arch::x86_64::*;
    let passes = multipliers
        .chunks_exact(FUNCTIONS_A_PASS)
        .zip(offsets.chunks_exact(FUNCTIONS_A_PASS))
        .zip(minima.chunks_exact_mut(FUNCTIONS_A_PASS));
    for ((a, b), lowest) in passes {
        let (a, b): (&[u32; 16], &[u32; 16]) = (a.try_into().unwrap(), b.try_into().unwrap());
        // SAFETY: unaligned loads of lanes 0-7 and 8-15 of the 16-lane arrays.
        let [a0, a1, b0, b1] = unsafe {
            [
                _mm256_loadu_si256(a.as_ptr().cast()),
                _mm256_loadu_si256(a.as_ptr().add(8).cast()),
                _mm256_loadu_si256(b.as_ptr().cast()),
                _mm256_loadu_si256(b.as_ptr().add(8).cast()),
            ]
        };
        let mut low0 = _mm256_set1_epi32(-1);
        let mut low1 = low0;
        for &shingle in x {
            let s = _mm256_set1_epi32(shingle as i32);
            low0 = _mm256_min_epu32(low0, _mm256_add_epi32(_mm256_mullo_epi32(a0, s), b0));
            low1 = _mm256_min_epu32(low1, _mm256_add_epi32(_mm256_mullo_epi32(a1, s), b1));
        }
        let out: &mut [u32; FUNCTIONS_A_PASS] = lowest.try_into().expect("a whole pass");
        // SAFETY: unaligned stores of 8 lanes each into the 16 of `out`.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().cast(), low0);
            _mm256_storeu_si256(out.as_mut_ptr().add(8).cast(), low1);
        }
    }
}

type MinimaKernel = fn(&mut [u32], &[u32], &[u32], &[u32]);

/// The widest `block_minima` this CPU runs.
fn minima_kernel() -> MinimaKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the feature `block_minima_avx2` is compiled for was just detected.
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
            .map(|_| {
                (
                    top_half(splitmix(&mut state)) | 1,
                    top_half(splitmix(&mut state)),
                )
            })
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
        let mut minima = Vec::new();
        self.signature_into(words, &mut Vec::new(), &mut minima);
        minima
    }

    /// `signature_of_words` into `minima`, the shingle hashes in `shingles` (both reused).
    fn signature_into(&self, words: &[u64], shingles: &mut Vec<u32>, minima: &mut Vec<u32>) {
        // The empty text is one empty word, as `signature` splits it.
        let empty = [word_hash(b"")];
        let words = if words.is_empty() { &empty[..] } else { words };
        let width = self.ngram.min(words.len()).max(1);
        shingle_hashes(words, width, shingles);
        minima.clear();
        minima.resize(self.multipliers.len(), u32::MAX);
        (self.minima)(minima, &self.multipliers, &self.offsets, shingles);
        minima.truncate(self.hashes);
    }

    /// One key a band: its `rows` minima hashed, the band's number in the top byte (so keys
    /// of different bands never meet).
    pub fn band_keys(&self, signature: &[u32]) -> Vec<u64> {
        signature
            .chunks(self.rows)
            .enumerate()
            .map(|(band, minima)| {
                let hash = xxh3_64_with_seed(&little_endian(minima), self.seed ^ band as u64);
                ((band as u64) << 56) | (hash >> 8)
            })
            .collect()
    }

    /// A document's fingerprint under `config` (near parts only when near dedup is on): one
    /// pass normalises the text and hashes its words. `scratch` holds the buffers between
    /// documents, so that a document costs no allocation but its fingerprint's.
    pub fn fingerprint(
        &self,
        config: &DedupConfig,
        text: &str,
        scratch: &mut Scratch,
    ) -> Fingerprint {
        let Scratch {
            normalised,
            spans,
            words,
            shingles,
            minima,
        } = scratch;
        if config.near {
            spans.clear();
            normalise_words(text, normalised, |start, end| spans.push((start, end)));
            // Sixteen bytes after the last word, so that each word's first sixteen bytes can
            // be read at once (`padded_word_hash`); NUL is UTF-8 and cut off again below.
            let length = normalised.len();
            normalised.push_str(WORD_PADDING);
            let bytes = normalised.as_bytes();
            words.clear();
            words.extend(
                spans
                    .iter()
                    .map(|&(start, end)| padded_word_hash(bytes, start, end)),
            );
            normalised.truncate(length);
        } else {
            normalise_into(text, normalised);
        }
        let mut fingerprint = Fingerprint {
            text: text_hash(normalised),
            ..Default::default()
        };
        if config.near {
            self.signature_into(words, shingles, minima);
            fingerprint.bands = self.band_keys(minima);
            fingerprint.sketch = sketch(minima);
        }
        fingerprint
    }
}

/// The buffers a fingerprint is computed in, kept from one document to the next.
#[derive(Default)]
pub struct Scratch {
    normalised: String,
    /// Where each word starts and ends in `normalised`.
    spans: Vec<(usize, usize)>,
    words: Vec<u64>,
    shingles: Vec<u32>,
    minima: Vec<u32>,
}

/// The bytes of `values`, each little-endian: on a little-endian CPU the values' own memory
/// (no copy for each band of each document), elsewhere a copy.
fn little_endian(values: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: four initialised bytes a u32, read as bytes within the slice's own memory
        // (u8 has no alignment to keep); on this CPU they are the little-endian bytes.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// A normalised word's hash, what shingles are made of: its bytes in groups of 8 (at least
/// one group, the last one padded with zeros), each xored into the state and mixed, the state
/// starting from the length. A word of up to 8 bytes (most words) is one `mix` of a value
/// that determines it, and `mix` is a bijection, so two such words never share a hash; longer
/// ones collide with the odds of 64-bit hashes.
pub fn word_hash(word: &[u8]) -> u64 {
    let mut state = (word.len() as u64).wrapping_mul(WORD_LENGTH_WEIGHT);
    if word.is_empty() {
        // One group of zeros.
        return crate::hash::mix(state);
    }
    for group in word.chunks(8) {
        let mut padded = [0u8; 8];
        padded[..group.len()].copy_from_slice(group);
        state = crate::hash::mix(state ^ u64::from_le_bytes(padded));
    }
    state
}

/// `word_hash(&bytes[start..end])` where at least 16 bytes of `bytes` follow `start`: a word
/// of up to 16 bytes (nearly all words) is read as two 8-byte loads, masked, and both mixes
/// are computed, the second kept only for a word of more than 8 bytes: no branch on the
/// length to mispredict, and no copy (the longer words take `word_hash`). Inlined into the
/// loop over a document's words, where a call a word cost as much as the hash.
#[inline(always)]
fn padded_word_hash(bytes: &[u8], start: usize, end: usize) -> u64 {
    let length = end - start;
    if length > 16 {
        return word_hash(&bytes[start..end]);
    }
    let load = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    // The low `n` bytes of a group (none when n is 0).
    let low_bytes = |n: usize| u64::MAX.checked_shr(64 - 8 * n.min(8) as u32).unwrap_or(0);
    let state = (length as u64).wrapping_mul(WORD_LENGTH_WEIGHT);
    let first = crate::hash::mix(state ^ (load(start) & low_bytes(length)));
    let second = crate::hash::mix(first ^ (load(start + 8) & low_bytes(length.saturating_sub(8))));
    // All ones when the word has a second group: a select, not a branch.
    let long = 0u64.wrapping_sub(u64::from(length > 8));
    (second & long) | (first & !long)
}

/// What `padded_word_hash` may read past the last word.
const WORD_PADDING: &str = "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// Spreads a word's length over the high bits, which a short word's bytes leave at zero.
const WORD_LENGTH_WEIGHT: u64 = 0xff51_afd7_ed55_8ccd;

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
