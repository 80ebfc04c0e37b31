//! What a run trains on and is evaluated on: the texts of a selection or a held-out set read
//! from Parquet, tokenised once; the training stream of a selection for one seed; the held-out
//! sample in windows that predict every token once.
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::EvalError;
use crate::source::string_at;

/// The Parquet files `path` names: the file itself, a folder's `*.parquet` files (subfolders
/// included, names starting with `.` or `_` skipped: temporary files and the job's state), or
/// the files a glob matches; in path order.
pub fn parquet_files(path: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let input = |message: String| EvalError::input(path, message);
    let pattern = if path.is_dir() {
        path.join("**").join("*.parquet")
    } else {
        path.to_path_buf()
    };
    let hidden = |p: &Path| {
        p.strip_prefix(path).unwrap_or(p).components().any(|c| {
            let name = c.as_os_str().to_string_lossy();
            name.starts_with('.') || name.starts_with('_')
        })
    };
    let files: Vec<PathBuf> = crate::source::discover(&pattern.to_string_lossy())
        .map_err(|e| input(e.to_string()))?
        .into_iter()
        .filter(|p| !(path.is_dir() && hidden(p)))
        .collect();
    if files.is_empty() {
        return Err(input("no Parquet file there".into()));
    }
    Ok(files)
}

/// The texts of `column` in `files`, in file and row order; null and blank texts skipped.
pub fn read_texts(files: &[PathBuf], column: &str) -> Result<Vec<String>, EvalError> {
    let mut texts = Vec::new();
    for path in files {
        let input = |e: &dyn std::fmt::Display| EvalError::input(path, e.to_string());
        let file = File::open(path).map_err(|e| input(&e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| input(&e))?;
        let fields = builder.schema().fields();
        let Some(index) = fields.iter().position(|f| f.name() == column) else {
            let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
            return Err(input(&format!(
                "no column {column:?} (columns: {})",
                names.join(", ")
            )));
        };
        let kind = fields[index].data_type();
        if !matches!(
            kind,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            return Err(input(&format!(
                "column {column:?} has type {kind}, not a string"
            )));
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| input(&e))?;
        for batch in reader {
            let batch = batch.map_err(|e| input(&e))?;
            let array = batch.column(0);
            for row in 0..batch.num_rows() {
                if let Some(text) = string_at(array, row).filter(|t| !t.trim().is_empty()) {
                    texts.push(text.to_string());
                }
            }
        }
    }
    Ok(texts)
}

/// Token ids of every text, as the model's tokenizer gives them (special tokens included).
pub fn encode(tokenizer: &Tokenizer, texts: &[String]) -> Result<Vec<Vec<i64>>, EvalError> {
    texts
        .iter()
        .map(|t| {
            let enc = tokenizer
                .encode(t.as_str(), true)
                .map_err(|e| EvalError::Settings(format!("tokenizer: {e}")))?;
            Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
        })
        .collect()
}

/// A selection, tokenised once for all its runs.
pub struct Selection {
    pub name: String,
    pub files: Vec<PathBuf>,
    pub docs: Vec<Vec<i64>>,
    /// Tokens of one pass: every document and its separator.
    pub tokens: u64,
    /// Fingerprint of the token ids (a changed selection is not reused from an earlier run).
    pub hash: u64,
}

impl Selection {
    pub fn new(name: &str, files: Vec<PathBuf>, docs: Vec<Vec<i64>>) -> Selection {
        let tokens = docs.iter().map(|d| d.len() as u64 + 1).sum();
        let hash = hash_sequences(&docs);
        Selection {
            name: name.to_string(),
            files,
            docs,
            tokens,
            hash,
        }
    }
}

/// A fingerprint of token sequences (their ids and where each ends).
fn hash_sequences(sequences: &[Vec<i64>]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for sequence in sequences {
        for t in sequence {
            hasher.update(&t.to_le_bytes());
        }
        hasher.update(&(-1i64).to_le_bytes());
    }
    hasher.digest()
}

/// The first `needed` tokens of the documents, each followed by `separator`, in an order
/// shuffled by `seed`; when one pass over them is too short they are reshuffled and repeated.
/// Returns the stream and the passes it took (fractional: 2.5 is two and a half passes).
pub fn token_stream(
    docs: &[Vec<i64>],
    separator: i64,
    needed: usize,
    seed: u64,
) -> (Vec<i64>, f64) {
    let per_pass: usize = docs.iter().map(|d| d.len() + 1).sum();
    if per_pass == 0 {
        return (Vec::new(), 0.0);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e1e_c7ed);
    let mut stream = Vec::with_capacity(needed);
    let mut order: Vec<usize> = (0..docs.len()).collect();
    'passes: loop {
        order.shuffle(&mut rng);
        for &i in &order {
            stream.extend_from_slice(&docs[i]);
            stream.push(separator);
            if stream.len() >= needed {
                break 'passes;
            }
        }
    }
    stream.truncate(needed);
    (stream, needed as f64 / per_pass as f64)
}

/// A held-out set as evaluated: a fixed sample of its documents in windows.
pub struct Heldout {
    pub name: String,
    pub path: PathBuf,
    /// Windows of at most seq_len + 1 tokens; every token of a document is a target once.
    pub windows: Vec<Vec<i64>>,
    /// Predicted tokens.
    pub tokens: u64,
    /// UTF-8 bytes of the evaluated documents.
    pub bytes: u64,
    pub documents: usize,
    /// Fingerprint of the windows.
    pub hash: u64,
}

impl Heldout {
    /// A fixed seeded sample of `texts` (tokenised as `docs`): whole documents until
    /// `max_tokens` tokens (all when 0), each preceded by `separator` so that its first token
    /// is predicted too, cut into windows of `seq_len + 1` tokens that overlap by one.
    pub fn sample(
        name: &str,
        path: &Path,
        texts: &[String],
        docs: &[Vec<i64>],
        separator: i64,
        seq_len: usize,
        max_tokens: u64,
    ) -> Heldout {
        let mut order: Vec<usize> = (0..docs.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(0x4e1d_u64));
        let (mut windows, mut tokens, mut bytes, mut documents) = (Vec::new(), 0u64, 0u64, 0usize);
        for i in order {
            if max_tokens > 0 && tokens >= max_tokens {
                break;
            }
            let mut ids = Vec::with_capacity(docs[i].len() + 1);
            ids.push(separator);
            ids.extend_from_slice(&docs[i]);
            let mut start = 0;
            while start + 1 < ids.len() {
                let end = (start + seq_len + 1).min(ids.len());
                windows.push(ids[start..end].to_vec());
                start += seq_len;
            }
            tokens += docs[i].len() as u64;
            bytes += texts[i].len() as u64;
            documents += 1;
        }
        let hash = hash_sequences(&windows);
        Heldout {
            name: name.to_string(),
            path: path.to_path_buf(),
            windows,
            tokens,
            bytes,
            documents,
            hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_repeats_a_short_selection_and_counts_passes() {
        let docs = vec![vec![1, 2, 3], vec![4, 5]];
        // One pass is 3 + 1 + 2 + 1 = 7 tokens; 17 tokens are 2 3/7 passes.
        let (stream, passes) = token_stream(&docs, 0, 17, 9);
        assert_eq!(stream.len(), 17);
        assert!((passes - 17.0 / 7.0).abs() < 1e-12);
        // Each full pass holds every document once.
        for pass in stream.chunks(7).take(2) {
            let mut sorted = pass.to_vec();
            sorted.sort();
            assert_eq!(sorted, vec![0, 0, 1, 2, 3, 4, 5]);
        }
        assert_eq!(token_stream(&docs, 0, 17, 9).0, stream, "seeded");
        let other = (0..20).any(|s| token_stream(&docs, 0, 17, s).0 != stream);
        assert!(other, "the seed changes the order");
    }

    #[test]
    fn heldout_windows_predict_every_token_once() {
        let texts = vec!["abcdefg".to_string(), "xy".to_string()];
        let docs = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![8, 9]];
        let h = Heldout::sample("h", Path::new("h"), &texts, &docs, 0, 3, 0);
        let windows = &h.windows;
        assert_eq!((h.tokens, h.bytes, h.documents), (9, 9, 2));
        let targets: usize = windows.iter().map(|w| w.len() - 1).sum();
        assert_eq!(targets as u64, h.tokens);
        assert!(windows.iter().all(|w| w.len() <= 4));
        assert!(windows.contains(&vec![0, 1, 2, 3]) && windows.contains(&vec![3, 4, 5, 6]));
        assert!(windows.contains(&vec![6, 7]) && windows.contains(&vec![0, 8, 9]));
        // A token cap keeps whole documents.
        let capped = Heldout::sample("h", Path::new("h"), &texts, &docs, 0, 3, 1);
        assert_eq!(capped.documents, 1);
        assert!(capped.tokens == 7 || capped.tokens == 2);
    }
}
