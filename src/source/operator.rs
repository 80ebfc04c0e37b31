//! The read stage in the dataflow: each epoch's shard read by its owner worker, which sends
//! the documents' metadata into the dataflow and keeps the shard (its rows, vectors and
//! rejects) until the sink has written it.
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::{DocMeta, EmbeddingColumn, ShardData, SourceConfig};
use crate::dedup::{DedupConfig, MinHasher, Scratch};
use crate::dsir::DsirWeights;
use crate::tokens::TokenCounter;

/// Rejected rows logged one by one per shard; the rest are counted.
const REJECTS_LOGGED_PER_SHARD: usize = 10;

/// The documents of one epoch, sent to the admit operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochDocs {
    pub epoch: u64,
    pub docs: Vec<DocMeta>,
}

/// An epoch's shard as its owner worker holds it until the sink has written it.
pub struct LocalShard {
    pub shard: PathBuf,
    pub data: Result<ShardData, String>,
}

/// The shards a worker holds, by epoch.
pub type LocalShards = Rc<RefCell<HashMap<u64, LocalShard>>>;

/// What the read stage computes of each document's text besides its tokens.
#[derive(Clone, Copy)]
pub struct TextFeatures<'a> {
    /// Text fingerprints for dedup (when `[dedup]` is on).
    pub dedup: &'a DedupConfig,
    /// The `dsir` strategy's weights: each document's log importance weight.
    pub dsir: Option<&'a DsirWeights>,
}

/// The documents with their text fingerprints (`[dedup]`) and DSIR weights: the costly part of
/// dedup and DSIR, done here, on the worker that read the shard, so that workers do it in
/// parallel.
fn annotated(data: &ShardData, text_column: &str, features: TextFeatures<'_>) -> Vec<DocMeta> {
    let mut docs = data.docs.clone();
    let dedup = features.dedup;
    if !dedup.enabled() && features.dsir.is_none() {
        return docs;
    }
    let hasher = dedup.enabled().then(|| MinHasher::new(dedup));
    let mut scratch = Scratch::default();
    for (doc, text) in docs.iter_mut().zip(data.doc_texts(text_column)) {
        if let Some(hasher) = &hasher {
            doc.fingerprint = Some(hasher.fingerprint(dedup, text, &mut scratch));
        }
        doc.dsir_log_weight = features.dsir.map(|w| w.log_weight(text));
    }
    docs
}

/// Reads a shard this worker owns (epoch `epoch`, at `path`) and keeps it until its epoch is
/// written; returns its documents (with the text `features` asked for), none when the shard is
/// quarantined.
pub fn read_local(
    epoch: u64,
    path: &Path,
    source: &SourceConfig,
    features: TextFeatures<'_>,
    counter: &TokenCounter,
    embedding: Option<&EmbeddingColumn>,
    local: &LocalShards,
) -> Vec<DocMeta> {
    let data = super::read_shard(path, source, counter, embedding).map_err(|e| {
        tracing::warn!(shard = %path.display(), "quarantined: {e}");
        e.to_string()
    });
    let docs = match &data {
        Ok(data) => {
            for reject in data.rejects.iter().take(REJECTS_LOGGED_PER_SHARD) {
                tracing::warn!(
                    "{}: row {}, column '{}': {}; row rejected",
                    path.display(),
                    reject.row,
                    reject.column,
                    reject.reason
                );
            }
            if data.rejects.len() > REJECTS_LOGGED_PER_SHARD {
                tracing::warn!(
                    "{}: {} more rejected rows",
                    path.display(),
                    data.rejects.len() - REJECTS_LOGGED_PER_SHARD
                );
            }
            if data.rows == 0 {
                tracing::warn!("{}: shard has no rows", path.display());
            }
            annotated(data, &source.text_column, features)
        }
        Err(_) => Vec::new(),
    };
    local.borrow_mut().insert(
        epoch,
        LocalShard {
            shard: path.to_path_buf(),
            data,
        },
    );
    docs
}
