//! Hugging Face model directories: config.json, model.safetensors (or the shards a
//! model.safetensors.index.json names), tokenizer.json. Pickled weights are refused.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use super::{pickle_refused, CausalLm, LlamaConfig, ModelError};

/// The safetensors files holding the weights of `dir`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::invalid(&index, format!("not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::invalid(&index, "no 'weight_map' object"))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| ModelError::tensor(&index, tensor, "shard name is not a string"))?;
            if file.contains('/') || file.contains("..") {
                return Err(ModelError::tensor(
                    &index,
                    tensor,
                    format!("shard '{file}' is outside the directory"),
                ));
            }
            files.insert(dir.join(file));
        }
        return Ok(files.into_iter().collect());
    }
    for pickled in [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.pt",
    ] {
        if dir.join(pickled).exists() {
            return Err(pickle_refused(&dir.join(pickled)));
        }
    }
    Err(ModelError::invalid(
        dir,
        "no model.safetensors or model.safetensors.index.json",
    ))
}

pub(crate) fn read_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path)
        .map_err(|e| ModelError::Tokenizer(format!("cannot load {}: {e}", path.display())))
}

pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<CausalLm, ModelError> {
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in weight_files(dir)? {
        let read = Tensor::read_safetensors(&file).map_err(|e| ModelError::Torch {
            context: format!("reading {}", file.display()),
            cause: e,
        })?;
        tensors.extend(read);
    }
    let tokenizer = read_tokenizer(&dir.join("tokenizer.json"))?;
    CausalLm::from_hf_tensors(cfg, tensors, tokenizer, device, kind, dir)
}
