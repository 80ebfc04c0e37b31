//! Fitted factors on disk: one safetensors file per (model, fitting settings, fitting data),
//! whose JSON header carries those settings and the model's hash, so a later run with the same
//! model and settings reuses the factors and any change refits them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::factors::{BlockFactors, BlockLayout, KfacFactors};
use super::InfluenceError;
use crate::model::CausalLm;

/// The header key holding the fitting key (settings, model hash, data hash).
const KEY_FIELD: &str = "quad_influence";
const LAYOUT_FIELD: &str = "layouts";

/// A hash of the model's weights (every variable, by name, as float32).
pub fn model_hash(model: &CausalLm) -> String {
    let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Xxh3::new();
    for (name, t) in vars {
        h.update(name.as_bytes());
        let values =
            Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1))
                .unwrap_or_default();
        for v in values {
            h.update(&v.to_le_bytes());
        }
    }
    format!("{:016x}", h.digest())
}

/// A hash of token sequences (the fitting data).
pub fn tokens_hash(docs: &[Vec<i64>]) -> String {
    let mut h = Xxh3::new();
    for d in docs {
        h.update(&(d.len() as u64).to_le_bytes());
        for t in d {
            h.update(&t.to_le_bytes());
        }
    }
    format!("{:016x}", h.digest())
}

/// The cache file for a fitting key (a JSON value).
pub fn cache_path(dir: &Path, key: &serde_json::Value) -> PathBuf {
    dir.join(format!(
        "factors-{:016x}.safetensors",
        xxh3_64(key.to_string().as_bytes())
    ))
}

struct Bytes {
    data: Vec<u8>,
    shape: Vec<usize>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        Dtype::F64
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(t: &Tensor) -> Bytes {
    let values = Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .unwrap_or_default();
    Bytes {
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        shape: t.size().iter().map(|&s| s as usize).collect(),
    }
}

/// Writes the factors with `key` in the header (temporary file, then rename).
pub fn save(
    path: &Path,
    key: &serde_json::Value,
    factors: &KfacFactors,
) -> Result<(), InfluenceError> {
    let err = |message: String| InfluenceError::Cache {
        path: path.to_path_buf(),
        message,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating the folder: {e}")))?;
    }
    let mut tensors: Vec<(String, Bytes)> = Vec::new();
    for (i, b) in factors.blocks.iter().enumerate() {
        tensors.push((format!("{i}.a_vals"), to_bytes(&b.a_vals)));
        tensors.push((format!("{i}.a_vecs"), to_bytes(&b.a_vecs)));
        tensors.push((format!("{i}.g_vals"), to_bytes(&b.g_vals)));
        tensors.push((format!("{i}.g_vecs"), to_bytes(&b.g_vecs)));
        if let Some(e) = &b.ekfac {
            tensors.push((format!("{i}.ekfac"), to_bytes(e)));
        }
    }
    let layouts: Vec<&BlockLayout> = factors.blocks.iter().map(|b| &b.layout).collect();
    let mut meta = HashMap::new();
    meta.insert(KEY_FIELD.to_string(), key.to_string());
    meta.insert(
        LAYOUT_FIELD.to_string(),
        serde_json::to_string(&layouts).unwrap_or_default(),
    );
    meta.insert("tokens".to_string(), factors.tokens.to_string());
    // One temporary file a process: the processes of a job fit the same factors and may
    // write the cache at once; each renames a whole file.
    let temp = path.with_extension(format!("safetensors.{}.tmp", std::process::id()));
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, b)| (n.as_str(), b)),
        &Some(meta),
        &temp,
    )
    .map_err(|e| err(format!("writing: {e}")))?;
    std::fs::rename(&temp, path).map_err(|e| err(format!("renaming: {e}")))?;
    Ok(())
}

/// Reads cached factors; None when there is no file or its key differs from `key`.
pub fn load(
    path: &Path,
    key: &serde_json::Value,
    device: Device,
) -> Result<Option<KfacFactors>, InfluenceError> {
    let err = |message: String| InfluenceError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let Ok(buffer) = std::fs::read(path) else {
        return Ok(None);
    };
    let (_, metadata) = SafeTensors::read_metadata(&buffer)
        .map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    if meta.get(KEY_FIELD) != Some(&key.to_string()) {
        return Ok(None);
    }
    let layouts: Vec<BlockLayout> =
        serde_json::from_str(meta.get(LAYOUT_FIELD).map(String::as_str).unwrap_or(""))
            .map_err(|e| err(format!("bad block layouts in the header: {e}")))?;
    let tokens = meta.get("tokens").and_then(|t| t.parse().ok()).unwrap_or(0);
    let st = SafeTensors::deserialize(&buffer).map_err(|e| err(e.to_string()))?;
    let get = |name: String| -> Result<Option<Tensor>, InfluenceError> {
        match st.tensor(&name) {
            Ok(view) => Tensor::try_from(view)
                .map(|t| Some(t.to_device(device)))
                .map_err(|e| err(format!("tensor {name}: {e}"))),
            Err(_) => Ok(None),
        }
    };
    let need =
        |name: String| get(name.clone())?.ok_or_else(|| err(format!("tensor {name} is missing")));
    let mut blocks = Vec::with_capacity(layouts.len());
    for (i, layout) in layouts.into_iter().enumerate() {
        blocks.push(BlockFactors {
            layout,
            a_vals: need(format!("{i}.a_vals"))?,
            a_vecs: need(format!("{i}.a_vecs"))?,
            g_vals: need(format!("{i}.g_vals"))?,
            g_vecs: need(format!("{i}.g_vecs"))?,
            ekfac: get(format!("{i}.ekfac"))?,
        });
    }
    Ok(Some(KfacFactors { blocks, tokens }))
}
