//! The architecture of a Llama-family causal LM, read from a Hugging Face `config.json` (or
//! built from GGUF metadata). Features the model does not implement are refused, never ignored:
//! a silently wrong model would give plausible but wrong influence scores.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ModelError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// Width of one attention head; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<i64>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: i64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

impl LlamaConfig {
    /// The tiny random-weight Llama of the integration tests, the scale bench and the GPU
    /// check: hidden 32, 2 layers, 4/2 heads, MLP 64, tied head, the tokenizer's vocabulary.
    pub fn tiny(vocab: i64) -> LlamaConfig {
        LlamaConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            vocab_size: vocab,
            tie_word_embeddings: true,
            max_position_embeddings: 512,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Output sizes of the fused QKV projection: [q, k, v].
    pub fn qkv_split(&self) -> Vec<i64> {
        let hd = self.head_dim();
        vec![
            self.num_attention_heads * hd,
            self.num_key_value_heads * hd,
            self.num_key_value_heads * hd,
        ]
    }

    /// Number of weights (embeddings and LM head included, the head once when tied).
    pub fn parameter_count(&self) -> i64 {
        let d = self.hidden_size;
        let qkv: i64 = self.qkv_split().iter().sum();
        let attn = qkv * d + self.num_attention_heads * self.head_dim() * d;
        let mlp = 3 * self.intermediate_size * d;
        let layer = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * layer + embed + head + d
    }

    /// Checks the sizes fit together; `path` names the file they came from.
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim.unwrap_or(1)),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(ModelError::invalid(
                    path,
                    format!("{name} = {v} must be > 0"),
                ));
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(ModelError::invalid(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ModelError::invalid(
                path,
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(ModelError::invalid(
                path,
                format!(
                    "head_dim {} must be even for rotary embeddings",
                    self.head_dim()
                ),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(ModelError::invalid(
                path,
                "rms_norm_eps and rope_theta must be > 0",
            ));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` of a `LlamaForCausalLM` (SmolLM, TinyLlama, Llama 2/3
    /// without rope scaling).
    pub fn from_hf_file(path: &Path) -> Result<LlamaConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::invalid(path, format!("not JSON: {e}")))?;
        LlamaConfig::from_hf_json(&v, path)
    }

    pub fn from_hf_json(v: &Value, path: &Path) -> Result<LlamaConfig, ModelError> {
        let str_field = |k: &str| v.get(k).and_then(Value::as_str);
        if let Some(mt) = str_field("model_type") {
            if mt != "llama" {
                return Err(ModelError::unsupported(
                    path,
                    format!("model_type '{mt}'; only 'llama' (LlamaForCausalLM) is implemented"),
                ));
            }
        }
        let act = str_field("hidden_act").unwrap_or("silu");
        if act != "silu" {
            return Err(ModelError::unsupported(
                path,
                format!("hidden_act '{act}'; only 'silu' is implemented"),
            ));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(ModelError::unsupported(
                    path,
                    format!("{flag} = true; projections with bias are not implemented"),
                ));
            }
        }
        if let Some(rs) = v.get("rope_scaling").filter(|x| !x.is_null()) {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if kind != "default" {
                return Err(ModelError::unsupported(
                    path,
                    format!(
                        "rope_scaling type '{kind}'; only plain rotary embeddings are implemented"
                    ),
                ));
            }
        }
        if let Some(t) = str_field("torch_dtype").or_else(|| str_field("dtype")) {
            let _ = t; // weights are cast to the requested kind at load time
        }
        let int = |k: &str| -> Result<i64, ModelError> {
            v.get(k).and_then(Value::as_i64).ok_or_else(|| {
                ModelError::invalid(path, format!("'{k}' is missing or not an integer"))
            })
        };
        let opt_int = |k: &str| v.get(k).and_then(Value::as_i64);
        // Llama 3 lists several eos ids; the first is the one generation stops at by default.
        let eos = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_i64),
            Some(x) => x.as_i64(),
            None => None,
        };
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let rope_theta = match v.get("rope_theta") {
            Some(x) => x
                .as_f64()
                .ok_or_else(|| ModelError::invalid(path, "'rope_theta' is not a number"))?,
            // transformers 5 moved rope_theta into rope_parameters
            None => v
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
        };
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: opt_int("num_key_value_heads").unwrap_or(heads),
            // Kept only where it differs from the default, so configs compare equal.
            head_dim: opt_int("head_dim").filter(|&hd| hd * heads != hidden),
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            vocab_size: int("vocab_size")?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: opt_int("max_position_embeddings").unwrap_or(2048),
            bos_token_id: opt_int("bos_token_id"),
            eos_token_id: eos,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The `config.json` transformers reads as a `LlamaForCausalLM`.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 100,
            "tie_word_embeddings": true, "max_position_embeddings": 256, "eos_token_id": [2, 3]
        })
    }

    #[test]
    fn reads_and_round_trips_hf_config() {
        let p = Path::new("config.json");
        let c = LlamaConfig::from_hf_json(&base(), p).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.qkv_split(), vec![64, 32, 32]);
        assert_eq!(c.eos_token_id, Some(2));
        let again = LlamaConfig::from_hf_json(&c.to_hf_json("float32"), p).unwrap();
        assert_eq!(c.head_dim, None);
        assert_eq!(again.head_dim(), c.head_dim());
    }

    #[test]
    fn refuses_unimplemented_features() {
        let p = Path::new("x/config.json");
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let err = LlamaConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(
            err.contains("llama3") && err.contains("x/config.json"),
            "{err}"
        );
        let mut v = base();
        v["model_type"] = "gpt2".into();
        assert!(LlamaConfig::from_hf_json(&v, p).is_err());
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        let err = LlamaConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }
}
