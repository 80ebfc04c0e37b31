//! Planted texts and tables the integration tests share: news-like template sentences and
//! random-character garbage (`quad eval`, `perplexity`), string tables, the tiny proxy shape.
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const SUBJECTS: [&str; 8] = [
    "The government",
    "The prime minister",
    "Officials",
    "The central bank",
    "Police",
    "The company",
    "Voters",
    "The city council",
];
const VERBS: [&str; 6] = [
    "announced",
    "said",
    "reported",
    "confirmed",
    "denied",
    "warned of",
];
const OBJECTS: [&str; 8] = [
    "new measures on Tuesday",
    "a rise in interest rates",
    "plans for the election next month",
    "an investigation into the incident",
    "higher taxes on fuel",
    "talks with union leaders",
    "a drop in unemployment",
    "the results of the inquiry",
];

/// A news-like document: 4 to 8 template sentences.
pub fn news(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(4..9);
    (0..n)
        .map(|_| {
            format!(
                "{} {} {}.",
                SUBJECTS[rng.random_range(0..SUBJECTS.len())],
                VERBS[rng.random_range(0..VERBS.len())],
                OBJECTS[rng.random_range(0..OBJECTS.len())]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Garbage: 30 to 60 random "words" of letters, digits and symbols.
pub fn garbage(rng: &mut ChaCha8Rng) -> String {
    const CHARS: &[u8] = b"qxzjkvwy0123456789#%&*@~^";
    let n = rng.random_range(30..61);
    (0..n)
        .map(|_| {
            let len = rng.random_range(2..7);
            (0..len)
                .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A table of non-null string columns, in the given order.
pub fn string_batch(columns: Vec<(&str, Vec<String>)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, _)| Field::new(*name, DataType::Utf8, false))
        .collect();
    let arrays: Vec<ArrayRef> = columns
        .into_iter()
        .map(|(_, values)| Arc::new(StringArray::from(values)) as ArrayRef)
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}

/// The shape of the tiny proxies the tests train (`[warmup]` keys): hidden 32, one layer.
pub const TINY_PROXY: &str = "hidden = 32
layers = 1
heads = 2
kv_heads = 1
intermediate = 64
seq_len = 32
";
