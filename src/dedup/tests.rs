use super::*;
use unicode_normalization::UnicodeNormalization;

/// The normalisation's definition, applied to the whole text at once.
fn whole(text: &str) -> String {
    let folded = text.nfkc().collect::<String>().to_lowercase();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn normalisation_a_piece_at_a_time_equals_the_whole_text_normalised() {
    let texts = [
        "Plain ASCII, Mixed Case\tand\x0bvertical tab",
        "caf\u{e9} cafe\u{301} e \u{301}acute after a space",
        "\u{301}leading mark, A\u{30a}\u{301} marks to reorder \u{316}\u{301}",
        "no\u{a0}break and ideographic\u{3000}space, ellipsis\u{2026} and \u{2122}",
        "\u{3a3}\u{39f}\u{3a3} \u{39f}\u{394}\u{39f}\u{3a3} final sigma: \u{391}\u{3a3}. x\u{3a3}y",
        "\u{fb01}ne \u{ff21}\u{ff22} \u{2460} \u{1100}\u{1161}\u{11a8} jamo, \u{2028}line\u{85}next",
        "\u{130}stanbul \u{1e9e} \u{df} \u{212b}ngstr\u{f6}m",
        // Pieces NFKC leaves as they are (lowercased a character at a time), one with a
        // whitespace character that has no decomposition inside it.
        "\u{201c}Quoted\u{201d} \u{2014} \u{dc}N\u{ef}C\u{d6}D\u{c9} ogham\u{1680}Space\u{2029}para",
        "\u{1f600}Emoji\u{2764} \u{4e2d}\u{6587} \u{41f}\u{420}\u{418}\u{412}\u{415}\u{422}",
    ];
    for text in texts {
        assert_eq!(normalise(text), whole(text), "{text:?}");
    }
}

#[test]
fn fingerprints_equal_normalising_then_hashing_the_words() {
    // The fingerprint hashes words while it normalises; the definition normalises, then
    // splits the result and hashes each word.
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    let long = words(0..40, "W\u{e9}").join("\u{a0}");
    // One scratch for all, as a shard's documents share one: nothing of a longer text stays.
    let mut scratch = Scratch::default();
    for text in [
        "",
        "   ",
        "one",
        "Two Words",
        "\u{201c}Quoted\u{201d} \u{dc}N\u{ef}C\u{d6}D\u{c9} ogham\u{1680}Space \u{fb01}ne \u{ff21}\u{ff22}",
        "\u{3a3}\u{39f}\u{3a3} final sigma x\u{3a3}y and no\u{a0}break",
        long.as_str(),
        "Two Words",
        "",
    ] {
        let normalised = normalise(text);
        let signature = signature_by_definition(&config, &normalised);
        let fingerprint = hasher.fingerprint(&config, text, &mut scratch);
        assert_eq!(fingerprint.text, text_hash(&normalised), "{text:?}");
        assert_eq!(fingerprint.bands, hasher.band_keys(&signature), "{text:?}");
        assert_eq!(fingerprint.sketch, sketch(&signature), "{text:?}");
    }
}

#[test]
fn normalisation_folds_compatibility_forms_case_and_whitespace() {
    assert_eq!(normalise("  Hello \t\n  World  "), "hello world");
    // NFKC: the ligature, full-width letters and the superscript become their plain forms.
    assert_eq!(normalise("ﬁne ＡＢＣ x²"), "fine abc x2");
    // A composed and a decomposed é are the same text.
    assert_eq!(normalise("Caf\u{e9}"), normalise("Cafe\u{301}"));
    // Non-breaking and ideographic spaces are whitespace runs too.
    assert_eq!(normalise("a\u{a0}\u{3000}b"), "a b");
    assert_eq!(normalise("   "), "");
    assert_eq!(
        text_hash(&normalise("The  Cat\n")),
        text_hash(&normalise("the cat"))
    );
    assert_ne!(text_hash("the cat"), text_hash("the cats"));
}

#[test]
fn banding_probability_matches_the_s_curve_of_fineweb() {
    let p = |s| band_match_probability(s, 14, 8);
    // The usual rule of thumb for the S-curve's midpoint, (1/b)^(1/r), is 0.72 here; the exact
    // 50% point, (1 - 2^(-1/b))^(1/r), is 0.685.
    assert!(((1.0f64 / 14.0).powf(1.0 / 8.0) - 0.72).abs() < 0.005);
    let midpoint = (1.0 - 0.5f64.powf(1.0 / 14.0)).powf(1.0 / 8.0);
    assert!((p(midpoint) - 0.5).abs() < 1e-9);
    assert!((midpoint - 0.685).abs() < 0.005, "{midpoint}");
    assert!(p(0.72) > 0.6 && p(0.65) < 0.4, "{} {}", p(0.72), p(0.65));
    assert!(p(0.85) > 0.95, "{}", p(0.85));
    assert!(p(0.5) < 0.06, "{}", p(0.5));
    assert_eq!(p(1.0), 1.0);
    assert_eq!(p(0.0), 0.0);
    // One band of one row is plain MinHash: P = s.
    assert!((band_match_probability(0.3, 1, 1) - 0.3).abs() < 1e-12);
}

#[test]
fn band_keys_are_one_a_band_numbered_in_the_top_byte() {
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    let signature = hasher.signature(&normalise("one two three four five six seven"));
    assert_eq!(signature.len(), 112);
    let keys = hasher.band_keys(&signature);
    assert_eq!(keys.len(), 14);
    for (band, key) in keys.iter().enumerate() {
        assert_eq!(key >> 56, band as u64);
    }
    // A band's key depends on its rows only: changing one minimum changes one key.
    let mut changed = signature.clone();
    changed[8 * 3 + 2] ^= 1;
    let other = hasher.band_keys(&changed);
    let differing: Vec<usize> = (0..14).filter(|&b| keys[b] != other[b]).collect();
    assert_eq!(differing, [3]);
}

/// Documents of `n` distinct words where the second shares the first `shared` words' n-grams.
fn words(range: std::ops::Range<usize>, tag: &str) -> Vec<String> {
    range.map(|i| format!("{tag}{i}")).collect()
}

#[test]
fn the_estimate_follows_the_jaccard_similarity_of_the_shingles() {
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    // a: words 0..200; b: words 40..240. Shingles (5-grams): 196 each, 156 shared.
    let a = words(0..200, "w").join(" ");
    let b = words(40..240, "w").join(" ");
    let truth = 156.0 / (196.0 + 196.0 - 156.0);
    let (sa, sb) = (hasher.signature(&a), hasher.signature(&b));
    let exact = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / 112.0;
    let estimate = estimated_jaccard(&sketch(&sa), &sketch(&sb));
    // 112 hashes: a standard error of about 0.04 at s = 0.66.
    assert!((exact - truth).abs() < 0.15, "{exact} vs {truth}");
    assert!((estimate - truth).abs() < 0.15, "{estimate} vs {truth}");
    assert_eq!(estimated_jaccard(&sketch(&sa), &sketch(&sa)), 1.0);
    let c = words(0..200, "z").join(" ");
    assert!(estimated_jaccard(&sketch(&sa), &sketch(&hasher.signature(&c))) < 0.1);
}

#[test]
fn fingerprints_depend_on_the_seed_and_skip_near_parts_when_off() {
    let text = "A text of some words, enough for a shingle or two.";
    let on = DedupConfig::default();
    let fp = MinHasher::new(&on).fingerprint(&on, text, &mut Scratch::default());
    assert_eq!((fp.bands.len(), fp.sketch.len()), (14, 112));
    let off = DedupConfig {
        near: false,
        ..on.clone()
    };
    let exact_only = MinHasher::new(&off).fingerprint(&off, text, &mut Scratch::default());
    assert_eq!(exact_only.text, fp.text);
    assert!(exact_only.bands.is_empty() && exact_only.sketch.is_empty());
    let seeded = DedupConfig { seed: 1, ..on };
    assert_ne!(
        MinHasher::new(&seeded)
            .fingerprint(&seeded, text, &mut Scratch::default())
            .bands,
        fp.bands
    );
    // A text shorter than a shingle is one shingle, not none.
    let short = MinHasher::new(&DedupConfig::default()).signature("two words");
    assert!(short.iter().all(|&m| m != u32::MAX));
}

#[test]
fn settings_are_checked() {
    let ok = DedupConfig::default();
    assert!(ok.validate().is_ok());
    for bad in [
        DedupConfig {
            threshold: 0.0,
            ..ok.clone()
        },
        DedupConfig {
            rows: 0,
            ..ok.clone()
        },
        DedupConfig {
            bands: 300,
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// A word's hash by its definition: mix(... mix(mix(len K ^ g1) ^ g2) ... ^ gn), the groups g
/// of 8 little-endian bytes, the last one padded with zeros, one group of zeros for the empty
/// word.
fn word_hash_by_definition(word: &[u8]) -> u64 {
    let mut padded = word.to_vec();
    padded.resize(word.len().div_ceil(8).max(1) * 8, 0);
    padded
        .chunks(8)
        .map(|g| u64::from_le_bytes(g.try_into().unwrap()))
        .fold(
            (word.len() as u64).wrapping_mul(0xff51_afd7_ed55_8ccd),
            |state, g| crate::hash::mix(state ^ g),
        )
}

#[test]
fn short_words_never_share_a_hash() {
    // Every word of up to 2 bytes, and words of 3 to 8 bytes that differ in one byte or in
    // trailing zeros (the padding): all distinct, as the bijection argument says; each equals
    // the definition, and the padded read of each equals the plain one.
    let mut seen = std::collections::HashSet::new();
    let mut words: Vec<Vec<u8>> = vec![vec![]];
    words.extend((0..=255u8).map(|a| vec![a]));
    words.extend((0..=255u8).flat_map(|a| (0..=255u8).map(move |b| vec![a, b])));
    for len in 3..=8 {
        words.push(vec![0; len]);
        words.push((1..=len as u8).collect());
    }
    let long = [
        &b"internationalisation"[..],
        b"12345678",
        b"123456789",
        b"1234567812345678",
        b"12345678123456781",
    ];
    for w in &words {
        assert!(seen.insert(word_hash(w)), "{w:?}");
    }
    for w in words.iter().map(Vec::as_slice).chain(long) {
        assert_eq!(word_hash(w), word_hash_by_definition(w), "{w:?}");
        // Other bytes after the word, as in a normalised text, or the padding only.
        let mut text = w.to_vec();
        text.extend(b" next words and more");
        assert_eq!(padded_word_hash(&text, 0, w.len()), word_hash(w), "{w:?}");
        let mut last = w.to_vec();
        last.extend([0; 16]);
        assert_eq!(padded_word_hash(&last, 0, w.len()), word_hash(w), "{w:?}");
    }
}

/// The signature by its definition, one function and one shingle at a time: the functions'
/// parameters from the seed's splitmix64 stream (a odd, then b), each shingle's polynomial in
/// its words' hashes computed on its own rather than rolled, h(x) = a x + b in 32-bit
/// arithmetic.
fn signature_by_definition(config: &DedupConfig, normalised: &str) -> Vec<u32> {
    let mut state = config.seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::hash::mix(state)
    };
    // The top 32 bits of each.
    let mut next32 = || (next() >> 32) as u32;
    let functions: Vec<(u32, u32)> = (0..config.hashes())
        .map(|_| (next32() | 1, next32()))
        .collect();
    let words: Vec<u64> = normalised
        .split(' ')
        .map(|w| word_hash_by_definition(w.as_bytes()))
        .collect();
    let width = config.ngram.min(words.len()).max(1);
    // Each window's polynomial sum_j w_j B^(width-1-j), evaluated on its own.
    let shingles: Vec<u32> = words
        .windows(width)
        .map(|window| {
            let sum = window.iter().enumerate().fold(0u64, |sum, (j, &w)| {
                let power = (0..width - 1 - j).fold(1u64, |p, _| p.wrapping_mul(SHINGLE_BASE));
                sum.wrapping_add(w.wrapping_mul(power))
            });
            (crate::hash::mix(sum) >> 32) as u32
        })
        .collect();
    functions
        .iter()
        .map(|&(a, b)| {
            let hash = |x: u32| a.wrapping_mul(x).wrapping_add(b);
            shingles.iter().map(|&x| hash(x)).min().unwrap()
        })
        .collect()
}

#[test]
fn signatures_equal_the_definition_for_any_number_of_functions() {
    let text = normalise(&words(0..300, "w").join(" "));
    // 112 (7 whole passes), 15 and 1 (a part pass), 1024 (the most allowed).
    for (bands, rows) in [(14, 8), (3, 5), (1, 1), (128, 8)] {
        for seed in [0, 7] {
            let config = DedupConfig {
                bands,
                rows,
                seed,
                ..DedupConfig::default()
            };
            let hasher = MinHasher::new(&config);
            for t in [text.as_str(), "two words", ""] {
                assert_eq!(
                    hasher.signature(t),
                    signature_by_definition(&config, t),
                    "{bands} x {rows}, seed {seed}, {t:.20}"
                );
            }
        }
    }
}

#[test]
fn ascii_texts_normalise_as_the_definition_says() {
    // ASCII pieces are copied whole and lowercased at the end; the definition folds each
    // character. Whitespace here: Unicode's ASCII whitespace, the vertical tab included, and
    // not the separators 0x1c-0x1f.
    for text in [
        "  Mixed CASE\t\ttabs\r\nand\x0bvertical\x0cform feed  ",
        "",
        "   ",
        "one",
        "\x1f unit separator is not whitespace \x1c",
        "ASCII Words beside caf\u{e9} and \u{ff21}\u{ff22}C Full-Width",
    ] {
        assert_eq!(normalise(text), whole(text), "{text:?}");
    }
}

#[test]
fn the_estimates_of_many_pairs_have_the_binomial_spread() {
    // 400 pairs of documents of 200 distinct words, the second shifted by 40 words: 196
    // shingles each, 156 shared, Jaccard s = 156/236, counted here from the windows
    // themselves. If the 112 functions agreed like independent draws, the fraction of equal
    // minima of a pair would have mean s and variance s(1-s)/112; functions that move
    // together (a poor family) widen the spread, a biased one moves the mean.
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    let (n, shift, width) = (200, 40, config.ngram);
    let shingles = |range: std::ops::Range<usize>| -> std::collections::HashSet<usize> {
        range.clone().take(range.len() + 1 - width).collect()
    };
    let (a, b) = (shingles(0..n), shingles(shift..shift + n));
    let s = a.intersection(&b).count() as f64 / a.union(&b).count() as f64;
    let fractions: Vec<f64> = (0..400)
        .map(|pair| {
            let tag = format!("p{pair}w");
            let first = hasher.signature(&words(0..n, &tag).join(" "));
            let second = hasher.signature(&words(shift..shift + n, &tag).join(" "));
            let equal = first.iter().zip(&second).filter(|(x, y)| x == y).count();
            equal as f64 / first.len() as f64
        })
        .collect();
    let count = fractions.len() as f64;
    let mean = fractions.iter().sum::<f64>() / count;
    let variance = fractions.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / (count - 1.0);
    let binomial = s * (1.0 - s) / 112.0;
    // The mean's standard error is sqrt(binomial / 400) = 0.0022; the sample variance's
    // relative standard error is sqrt(2 / 399) = 7%.
    assert!((mean - s).abs() < 0.01, "mean {mean} against s = {s}");
    let ratio = variance / binomial;
    assert!(
        (0.75..1.3).contains(&ratio),
        "variance {ratio} x the binomial's"
    );
}

#[test]
fn the_avx2_kernel_equals_the_portable_one() {
    // The kernel this CPU runs against the portable loop, on random functions and shingles
    // (values near 0 and 2^32 included, where a signed minimum would differ).
    let mut state = 3u64;
    let mut next = || (splitmix(&mut state) >> 32) as u32;
    let functions = 4 * FUNCTIONS_A_PASS;
    let multipliers: Vec<u32> = (0..functions).map(|_| next() | 1).collect();
    let offsets: Vec<u32> = (0..functions).map(|_| next()).collect();
    for count in [1, 7, 300] {
        let mut shingles: Vec<u32> = (0..count).map(|_| next()).collect();
        shingles[0] = 0;
        let mut portable = vec![0; functions];
        block_minima(&mut portable, &multipliers, &offsets, &shingles);
        let mut chosen = vec![0; functions];
        minima_kernel()(&mut chosen, &multipliers, &offsets, &shingles);
        assert_eq!(chosen, portable, "{count} shingles");
    }
}

#[test]
fn texts_of_any_spacing_normalise_as_the_definition_says() {
    // Runs of whitespace at every offset of the 64-byte blocks the passes work in (at block
    // edges, spanning blocks, whole blocks of spaces, at the start and the end), in ASCII texts
    // and in texts with a few other pieces among the ASCII ones: composed and decomposed
    // letters, a capital ASCII letter before a mark that composes only with its small letter
    // (J and a caron), a sigma, pieces NFKC turns into whitespace or splits.
    let mut state = 0x5eed_u64;
    let mut next = |below: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % below
    };
    let ascii = [
        " ", "  ", "\t", "\n\n", " \r\n ", "\x0b", "Word", "a", "MiXeD", "x1",
    ];
    let other = [
        "caf\u{e9}",
        "Cafe\u{301}",
        "J\u{30c}",
        "\u{2014}",
        "\u{201c}Quoted\u{201d}",
        "\u{3a3}\u{39f}\u{3a3}",
        "x\u{3a3}",
        "\u{3000}",
        "no\u{a0}break",
        "\u{fb01}ne",
        "\u{ff21}\u{ff22}",
        "\u{4e2d}\u{6587}",
        "\u{e2}\u{20ac}\u{2122}",
    ];
    for round in 0..4_000 {
        let mut text = String::new();
        let length = next(300) as usize;
        while text.len() < length {
            let piece = if round % 2 == 1 && next(8) == 0 {
                other[next(other.len() as u64) as usize]
            } else {
                ascii[next(ascii.len() as u64) as usize]
            };
            let repeat = if piece.trim().is_empty() {
                next(70) + 1
            } else {
                1
            };
            (0..repeat).for_each(|_| text.push_str(piece));
        }
        let expected = whole(&text);
        assert_eq!(normalise(&text), expected, "{text:?}");
        let mut spans = Vec::new();
        let mut out = String::new();
        normalise_words(&text, &mut out, |start, end| spans.push((start, end)));
        assert_eq!(out, expected, "{text:?}");
        assert_eq!(spans, word_spans(&expected), "{text:?}");
    }
}

/// Where each word of a normalised text starts and ends (none in the empty text).
fn word_spans(normalised: &str) -> Vec<(usize, usize)> {
    if normalised.is_empty() {
        return Vec::new();
    }
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, b) in normalised.bytes().enumerate() {
        if b == b' ' {
            spans.push((start, i));
            start = i + 1;
        }
    }
    spans.push((start, normalised.len()));
    spans
}
