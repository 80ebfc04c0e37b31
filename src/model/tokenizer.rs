//! The byte-level BPE tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata, rebuilt
//! as a `tokenizers` Tokenizer the way the Hugging Face tokenizer.json of GPT-2 / SmolLM is
//! laid out (ByteLevel pre-tokenizer and decoder; SmolLM also splits digits one by one).
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use super::gguf::Value;
use super::ModelError;

/// llama.cpp's token types: 3 = control (special), 4 = user-defined (added).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn byte_level() -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
}

pub fn from_gguf(meta: &HashMap<String, Value>, path: &Path) -> Result<Tokenizer, ModelError> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("?");
    if model != "gpt2" {
        return Err(ModelError::unsupported(
            path,
            format!("tokenizer.ggml.model '{model}'; only byte-level BPE ('gpt2') is implemented"),
        ));
    }
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level()]}),
        "default" | "gpt2" => byte_level(),
        other => {
            return Err(ModelError::unsupported(
                path,
                format!(
                "tokenizer.ggml.pre '{other}'; 'smollm' and 'gpt2' pre-tokenizers are implemented"
            ),
            ))
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, ModelError> {
        let arr = meta.get(key).and_then(Value::as_array).ok_or_else(|| {
            ModelError::invalid(path, format!("metadata '{key}' is missing or not an array"))
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ModelError::invalid(path, format!("{key}[{i}] is not a string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == CONTROL}),
            );
        }
    }
    let add_bos = meta.get("tokenizer.ggml.add_bos_token") == Some(&Value::Bool(true));
    let bos = meta
        .get("tokenizer.ggml.bos_token_id")
        .and_then(Value::as_i64);
    let post_processor = match (add_bos, bos) {
        (true, Some(id)) => {
            let tok = tokens.get(id as usize).ok_or_else(|| {
                ModelError::invalid(
                    path,
                    format!("tokenizer.ggml.bos_token_id {id} is out of the vocabulary"),
                )
            })?;
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tok.as_str(): {"id": tok, "ids": [id], "tokens": [tok]}}})
        }
        _ => Json::Null,
    };
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| {
        ModelError::Tokenizer(format!(
            "{}: cannot build the BPE tokenizer: {e}",
            path.display()
        ))
    })
}
