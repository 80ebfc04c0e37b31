//! From a job spec to a ready `InfluenceScorer`: load the model, read the reference set and a
//! seeded pool sample (or the one a job's store kept, `stored_fit_pool`), fit (or reuse cached)
//! factors, compute the reference gradient.
use std::path::Path;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::scorer::{fit_factors, parse_device, parse_kind, FitSettings, ScorerSettings};
use super::{
    cache, InfluenceConfig, InfluenceError, InfluenceScorer, Preconditioner, ReferenceGradient,
};
use crate::bandit::DocLoc;
use crate::membership::{texts_at, ShardPaths};
use crate::model::CausalLm;
use crate::source::{id_at, read_shard, string_at, SourceConfig};
use crate::state::StateStore;
use crate::tokens::TokenCounter;

/// (id, text) of every row of a Parquet file with the source's id and text columns that ingest
/// would accept. A row ingest rejects (null or empty text, null id) is skipped, and the skips
/// are logged with the file, the first row, column and reason; an unreadable file is an error.
pub fn read_documents(
    path: &Path,
    source: &SourceConfig,
) -> Result<Vec<(String, String)>, InfluenceError> {
    let input = |message: String| InfluenceError::Input {
        path: path.to_path_buf(),
        message,
    };
    let config = SourceConfig {
        shards: String::new(),
        columns: Some(Vec::new()),
        ..source.clone()
    };
    let counter = TokenCounter::from_spec("whitespace").map_err(|e| input(e.to_string()))?;
    let data = read_shard(path, &config, &counter, None).map_err(|e| input(e.to_string()))?;
    if let Some(r) = data.rejects.first() {
        tracing::warn!(
            file = %path.display(),
            rows = data.rejects.len(),
            first = %format!("row {}, column '{}': {}", r.row, r.column, r.reason),
            "rows that ingest rejects are skipped"
        );
    }
    let index = |name: &str| data.schema.fields().iter().position(|f| f.name() == name);
    let (Some(id_col), Some(text_col)) = (index(&source.id_column), index(&source.text_column))
    else {
        return Err(input("id or text column missing after projection".into()));
    };
    let rejected: std::collections::BTreeSet<u64> = data.rejects.iter().map(|r| r.row).collect();
    let mut out = Vec::with_capacity(data.docs.len());
    let mut shard_row = 0u64;
    for batch in &data.batches {
        for row in 0..batch.num_rows() {
            let cells = (
                id_at(batch.column(id_col), row),
                string_at(batch.column(text_col), row),
            );
            if let (false, (Some(id), Some(text))) = (rejected.contains(&shard_row), cells) {
                out.push((id, text.to_string()));
            }
            shard_row += 1;
        }
    }
    Ok(out)
}

/// A seeded sample of `n` documents from the shards matching `glob` (in path order, then
/// shuffled with the seed).
pub fn pool_sample(
    glob: &str,
    source: &SourceConfig,
    n: usize,
    seed: u64,
) -> Result<Vec<String>, InfluenceError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let shards =
        crate::source::discover(glob).map_err(|e| InfluenceError::Settings(e.to_string()))?;
    let mut texts = Vec::new();
    for shard in &shards {
        // A shard the job would quarantine is left out of the sample, not fatal.
        match read_documents(shard, source) {
            Ok(docs) => texts.extend(docs.into_iter().map(|(_, t)| t)),
            Err(e) => tracing::warn!(error = %e, "pool sample: shard skipped"),
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9001);
    texts.shuffle(&mut rng);
    texts.truncate(n);
    Ok(texts)
}

fn encode_all(
    model: &CausalLm,
    texts: &[String],
    max_tokens: Option<usize>,
) -> Result<Vec<Vec<i64>>, InfluenceError> {
    texts
        .iter()
        .map(|t| {
            let mut ids = model.encode(t)?;
            ids.truncate(max_tokens.unwrap_or(usize::MAX));
            Ok(ids)
        })
        .collect()
}

/// Where the pool documents of the factor fit come from.
pub enum FitPool<'a> {
    /// A seeded sample of `influence.fit_pool_docs` documents read from the shards of a glob
    /// (tools that run outside a job: `quad score`, `quad tune`).
    Glob(&'a str),
    /// The sample a job kept during ingest (`StateStore::fit_sample`): `identity` names its
    /// documents (so the factor cache key is known without reading them), `texts` fetches
    /// them, which only a cache miss does.
    Stored {
        identity: String,
        texts: Box<dyn FnOnce() -> Result<Vec<String>, InfluenceError> + 'a>,
    },
}

/// The factor-fitting pool sample a job's store kept during ingest (a few hundred documents):
/// named by a hash of its documents' id hashes and locations, which the factor cache key
/// uses, and fetched by location only when the factors are fitted (no pass over the pool).
pub fn stored_fit_pool(
    store: &Arc<StateStore>,
    source: &SourceConfig,
    n: usize,
) -> anyhow::Result<FitPool<'static>> {
    Ok(fit_pool_of(store, source, store.fit_sample(n)?))
}

/// The fitting pool of the documents at `sample`'s locations (a store's `fit_sample`, or the
/// first of several stores' together), read from their shards (whose paths `store` knows).
pub fn fit_pool_of(
    store: &Arc<StateStore>,
    source: &SourceConfig,
    sample: Vec<(u64, DocLoc)>,
) -> FitPool<'static> {
    let mut identity = xxhash_rust::xxh3::Xxh3::new();
    for (priority, loc) in &sample {
        for word in [*priority, loc.shard, u64::from(loc.row_group), loc.row] {
            identity.update(&word.to_le_bytes());
        }
    }
    let (store, source) = (store.clone(), source.clone());
    FitPool::Stored {
        identity: format!("{:016x}", identity.digest()),
        texts: Box::new(move || {
            let locations: Vec<DocLoc> = sample.iter().map(|(_, loc)| *loc).collect();
            Ok::<_, InfluenceError>(readable_texts(&ShardPaths::new(store), &source, &locations))
        }),
    }
}

/// The texts at `locations` that can still be read, in their order, read shard by shard: a
/// text that is null now or a shard that is gone or unreadable is left out of the sample (and
/// logged), not fatal.
fn readable_texts(shards: &ShardPaths, source: &SourceConfig, locations: &[DocLoc]) -> Vec<String> {
    let mut by_shard: std::collections::BTreeMap<u64, Vec<DocLoc>> = Default::default();
    for loc in locations {
        by_shard.entry(loc.shard).or_default().push(*loc);
    }
    let mut found: std::collections::BTreeMap<(u64, u64), String> = Default::default();
    for (epoch, locs) in by_shard {
        match texts_at(shards, source, &locs) {
            Ok(texts) => {
                let nulls = texts.iter().filter(|t| t.is_none()).count();
                if nulls > 0 {
                    tracing::warn!(epoch, nulls, "factor-fitting sample: null texts left out");
                }
                for (loc, text) in locs.iter().zip(texts) {
                    if let Some(text) = text {
                        found.insert((loc.shard, loc.row), text);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(epoch, error = %format!("{e:#}"), "factor-fitting sample: shard left out")
            }
        }
    }
    locations
        .iter()
        .filter_map(|loc| found.remove(&(loc.shard, loc.row)))
        .collect()
}

/// The kind of device, for the factor cache key (factors fitted on one GPU serve another).
fn device_kind(device: tch::Device) -> &'static str {
    match device {
        tch::Device::Cpu => "cpu",
        tch::Device::Cuda(_) => "cuda",
        tch::Device::Mps => "mps",
        tch::Device::Vulkan => "vulkan",
    }
}

/// The factor cache key: every setting that changes the fitted factors (sampled labels depend on
/// the padding of a batch, kernels on the dtype and the kind of device), the model's hash, and
/// the fitting data by identity (the reference set's token hash, the pool sample's identity).
/// Settings that only change scoring (damping, normalisation, sketches) are left out.
pub fn factor_cache_key(
    cfg: &InfluenceConfig,
    device: tch::Device,
    model_hash: &str,
    reference_hash: &str,
    pool_identity: &str,
    seed: u64,
) -> serde_json::Value {
    serde_json::json!({
        // 3: EK-FAC eigenvalues from per-example gradients, fitting batches cut documents.
        "version": 3,
        "model": model_hash,
        "dtype": cfg.dtype,
        "device": device_kind(device),
        "fisher": cfg.fisher,
        "convention": cfg.convention,
        "qkv": cfg.qkv,
        "gate_up": cfg.gate_up,
        "ekfac": cfg.preconditioner == Preconditioner::Ekfac,
        "window": cfg.window,
        "batch": cfg.batch,
        "max_tokens": cfg.max_tokens,
        "seed": seed,
        "reference": reference_hash,
        "pool": pool_identity,
    })
}

/// Builds the scorer the `[influence]` section describes, fitting its factors on the reference
/// set and the pool sample.
pub fn build_scorer(
    cfg: &InfluenceConfig,
    source: &SourceConfig,
    pool: FitPool<'_>,
    seed: u64,
) -> Result<InfluenceScorer, InfluenceError> {
    let device = parse_device(&cfg.device).map_err(InfluenceError::Settings)?;
    let kind = parse_kind(&cfg.dtype).map_err(InfluenceError::Settings)?;
    let model = CausalLm::load(&cfg.model, device, kind)?;
    let mut reference: Vec<String> = read_documents(&cfg.reference, source)?
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    if let Some(n) = cfg.reference_docs {
        reference.truncate(n);
    }
    let reference = encode_all(&model, &reference, cfg.max_tokens)?;
    tracing::info!(model = %cfg.model.display(), reference = reference.len(), "influence model loaded");
    let factors = if cfg.preconditioner == Preconditioner::Identity {
        None
    } else {
        type Tokens<'b> = Box<dyn FnOnce() -> Result<Vec<Vec<i64>>, InfluenceError> + 'b>;
        let (pool_identity, pool_tokens): (String, Tokens<'_>) = match pool {
            FitPool::Glob(glob) => {
                let texts = pool_sample(glob, source, cfg.fit_pool_docs, seed)?;
                let tokens = encode_all(&model, &texts, cfg.max_tokens)?;
                (cache::tokens_hash(&tokens), Box::new(move || Ok(tokens)))
            }
            FitPool::Stored { identity, texts } => (
                identity,
                Box::new(|| encode_all(&model, &texts()?, cfg.max_tokens)),
            ),
        };
        let settings = FitSettings {
            fisher: cfg.fisher,
            convention: cfg.convention,
            qkv: cfg.qkv,
            gate_up: cfg.gate_up,
            ekfac: cfg.preconditioner == Preconditioner::Ekfac,
            window: cfg.window,
            batch: cfg.batch,
            seed,
        };
        let key = factor_cache_key(
            cfg,
            device,
            &cache::model_hash(&model),
            &cache::tokens_hash(&reference),
            &pool_identity,
            seed,
        );
        let dir = cfg
            .factor_cache
            .clone()
            .unwrap_or_else(|| cfg.model.with_extension("factors"));
        let path = cache::cache_path(&dir, &key);
        match cache::load(&path, &key, device)? {
            Some(f) => {
                tracing::info!(path = %path.display(), "reusing cached K-FAC factors");
                Some(f)
            }
            None => {
                let mut fit = reference.clone();
                fit.extend(pool_tokens()?);
                tracing::info!(docs = fit.len(), "fitting K-FAC factors");
                let f = fit_factors(&model, &fit, &settings)?;
                cache::save(&path, &key, &f)?;
                tracing::info!(path = %path.display(), "K-FAC factors saved");
                Some(f)
            }
        }
    };
    let v = ReferenceGradient::compute(&model, &reference, cfg.window, cfg.batch)?;
    let settings = ScorerSettings {
        preconditioner: cfg.preconditioner,
        damping: cfg.damping_rule(),
        window: cfg.window,
        batch: cfg.batch,
        normalise: cfg.normalise,
        sketch_dim: cfg.sketch_dim,
        max_tokens: cfg.max_tokens,
        seed,
    };
    InfluenceScorer::new(model, factors.as_ref(), &v, settings)
}
