//! GGUF (v2/v3) files of Llama models, as llama.cpp writes them: the metadata becomes a
//! [`LlamaConfig`] and a byte-level BPE tokenizer, the tensors are dequantised (F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1) and renamed to Hugging Face names, and llama.cpp's interleaving of the
//! Q and K rows is undone so the rotate-half rotary embedding applies.
use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{tokenizer, CausalLm, LlamaConfig, ModelError};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    /// u64 values that do not fit an i64 are kept as such.
    U64(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::U64(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: dims[0] is the fastest-varying (a torch [out, in] weight is [in, out]).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// From the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file, its bytes kept in memory.
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
    data_start: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()? as usize;
        let at = self.pos;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("string at byte {at} is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::Int(self.array::<1>()?[0] as i64),
            1 => Value::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.array()?) as i64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let inner = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.bytes.len() {
                    return Err(format!("array of {n} elements is longer than the file"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// ggml type ids and names, for the types this loader dequantises and for error messages.
const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;

fn type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        30 => "BF16",
        _ => return format!("ggml type {t}"),
    };
    name.to_string()
}

/// (elements per block, bytes per block) of a supported type.
fn block_layout(t: u32) -> Option<(usize, usize)> {
    match t {
        F32 => Some((1, 4)),
        F16 | BF16 => Some((1, 2)),
        Q4_0 => Some((32, 18)),
        Q4_1 => Some((32, 20)),
        Q8_0 => Some((32, 34)),
        _ => None,
    }
}

/// IEEE half to f32.
fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let mant = (bits & 0x3ff) as u32;
    let out = match (exp, mant) {
        (0, 0) => sign,
        // subnormal: m * 2^-24, exact in f32
        (0, m) => sign | ((m as f32) * 2f32.powi(-24)).to_bits(),
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(out)
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantises `n` elements of type `t` from `b` (exactly the bytes they take).
fn dequantize(t: u32, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match t {
        F32 => out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        F16 => out.extend(
            b.chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        BF16 => out.extend(
            b.chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
        ),
        Q8_0 => {
            for blk in b.chunks_exact(34) {
                let d = half_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        Q4_0 | Q4_1 => {
            // Q4_0: d, 16 bytes of nibbles, x = (q - 8) d. Q4_1: d, m, nibbles, x = q d + m.
            // Low nibbles are elements 0..16 of the block, high nibbles 16..32.
            let (size, qs) = if t == Q4_0 { (18, 2) } else { (20, 4) };
            for blk in b.chunks_exact(size) {
                let d = half_at(blk, 0);
                let (m, bias) = if t == Q4_0 {
                    (0.0, 8)
                } else {
                    (half_at(blk, 2), 0)
                };
                let nib = &blk[qs..qs + 16];
                out.extend(
                    nib.iter()
                        .map(|&q| ((q & 0xf) as i32 - bias) as f32 * d + m),
                );
                out.extend(nib.iter().map(|&q| ((q >> 4) as i32 - bias) as f32 * d + m));
            }
        }
        _ => unreachable!("checked by block_layout"),
    }
    out
}

impl GgufFile {
    pub fn read(path: &Path) -> Result<GgufFile, ModelError> {
        let data = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        GgufFile::parse(data)
            .map_err(|m| ModelError::invalid(path, format!("not a valid GGUF file: {m}")))
    }

    fn parse(data: Vec<u8>) -> Result<GgufFile, String> {
        let mut r = Reader {
            bytes: &data,
            pos: 0,
        };
        if r.take(4)? != b"GGUF" {
            return Err("missing the 'GGUF' magic".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("version {version}; versions 2 and 3 are supported"));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r
                .value(ty, 0)
                .map_err(|e| format!("metadata '{key}': {e}"))?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(format!("tensor '{name}' has {n_dims} dimensions"));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_i64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.div_ceil(align) * align;
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            data,
            data_start,
        })
    }

    /// Dequantised tensor in torch order (dims reversed), as Float.
    pub fn tensor(&self, info: &TensorInfo, path: &Path) -> Result<Tensor, ModelError> {
        let (per_block, block_bytes) = block_layout(info.ggml_type).ok_or_else(|| {
            ModelError::tensor(
                path,
                &info.name,
                format!(
                    "type {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                    type_name(info.ggml_type)
                ),
            )
        })?;
        let n: u64 = info.dims.iter().product();
        let n = n as usize;
        if n % per_block != 0 {
            return Err(ModelError::tensor(
                path,
                &info.name,
                format!("{n} elements are not whole blocks of {per_block}"),
            ));
        }
        let bytes = n / per_block * block_bytes;
        let start = self.data_start + info.offset as usize;
        let slice = start
            .checked_add(bytes)
            .filter(|&end| end <= self.data.len())
            .map(|end| &self.data[start..end])
            .ok_or_else(|| {
                ModelError::tensor(path, &info.name, "data lies beyond the end of the file")
            })?;
        let values = dequantize(info.ggml_type, slice, n);
        let shape: Vec<i64> = info.dims.iter().rev().map(|&d| d as i64).collect();
        Ok(Tensor::from_slice(&values).view(shape.as_slice()))
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

/// The [`LlamaConfig`] of a llama-architecture GGUF's metadata.
pub fn config_from_metadata(f: &GgufFile, path: &Path) -> Result<LlamaConfig, ModelError> {
    let arch = f
        .meta("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("?");
    if arch != "llama" {
        return Err(ModelError::unsupported(
            path,
            format!("general.architecture '{arch}'; only 'llama' is implemented"),
        ));
    }
    let int = |k: &str| {
        f.meta(k).and_then(Value::as_i64).ok_or_else(|| {
            ModelError::invalid(path, format!("metadata '{k}' is missing or not an integer"))
        })
    };
    let float = |k: &str, default: f64| f.meta(k).and_then(Value::as_f64).unwrap_or(default);
    if let Some(kind) = f.meta("llama.rope.scaling.type").and_then(Value::as_str) {
        if kind != "none" {
            return Err(ModelError::unsupported(path, format!("llama.rope.scaling.type '{kind}'; only plain rotary embeddings are implemented")));
        }
    }
    let heads = int("llama.attention.head_count")?;
    let hidden = int("llama.embedding_length")?;
    let vocab = match f.meta("llama.vocab_size").and_then(Value::as_i64) {
        Some(v) => v,
        None => f
            .meta("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len() as i64)
            .ok_or_else(|| {
                ModelError::invalid(path, "neither llama.vocab_size nor tokenizer.ggml.tokens")
            })?,
    };
    let head_dim = f
        .meta("llama.attention.key_length")
        .or_else(|| f.meta("llama.rope.dimension_count"))
        .and_then(Value::as_i64)
        .filter(|&hd| hd * heads != hidden);
    let tied = !f.tensors.iter().any(|t| t.name == "output.weight");
    let cfg = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: f
            .meta("llama.attention.head_count_kv")
            .and_then(Value::as_i64)
            .unwrap_or(heads),
        head_dim,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: float("llama.rope.freq_base", 10_000.0),
        vocab_size: vocab,
        tie_word_embeddings: tied,
        max_position_embeddings: int("llama.context_length")?,
        bos_token_id: f
            .meta("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_i64),
        eos_token_id: f
            .meta("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_i64),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// The Hugging Face name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes convert_hf_to_gguf.py's `permute`, which interleaves the two rotary halves of each
/// head's rows (llama.cpp rotates adjacent pairs; Hugging Face rotates halves).
pub fn unpermute(w: &Tensor, heads: i64) -> Tensor {
    let size = w.size();
    let (rows, cols) = (size[0], size[1]);
    w.view([heads, rows / heads / 2, 2, cols])
        .transpose(1, 2)
        .contiguous()
        .view([rows, cols])
}

pub fn load(path: &Path, device: Device, kind: Kind) -> Result<CausalLm, ModelError> {
    let f = GgufFile::read(path)?;
    let cfg = config_from_metadata(&f, path)?;
    let tok = tokenizer::from_gguf(&f.metadata, path)?;
    let mut tensors = HashMap::new();
    for info in &f.tensors {
        let name = hf_name(&info.name)
            .ok_or_else(|| ModelError::tensor(path, &info.name, "not a tensor of a llama model"))?;
        let mut t = f.tensor(info, path)?;
        if name.ends_with("q_proj.weight") {
            t = unpermute(&t, cfg.num_attention_heads);
        } else if name.ends_with("k_proj.weight") {
            t = unpermute(&t, cfg.num_key_value_heads);
        }
        tensors.insert(name, t);
    }
    CausalLm::from_hf_tensors(cfg, tensors, tok, device, kind, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn q4_1_and_q8_0_blocks_dequantise() {
        // Q4_1: d = 0.5, m = -1, nibbles q_j = j % 16 low, 15 - j % 16 high.
        let mut blk = vec![0x00, 0x38, 0x00, 0xbc];
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantize(Q4_1, &blk, 32);
        assert_eq!(x[0], -1.0);
        assert_eq!(x[3], 0.5);
        assert_eq!(x[16], 6.5);
        assert_eq!(x[31], -1.0);
        // Q8_0: d = 2, q = -3.
        let mut blk = vec![0x00, 0x40];
        blk.extend([253u8; 32]);
        assert_eq!(dequantize(Q8_0, &blk, 32), vec![-6.0; 32]);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let heads = 2;
        let w = Tensor::arange(8 * 3, (Kind::Float, Device::Cpu)).view([8, 3]);
        // llama.cpp: reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2)
        let permuted = w
            .view([heads, 2, 2, 3])
            .transpose(1, 2)
            .contiguous()
            .view([8, 3]);
        assert!(unpermute(&permuted, heads).equal(&w));
    }

    #[test]
    fn truncated_file_is_refused() {
        let err = GgufFile::parse(b"GGUF\x03\x00\x00\x00\x01".to_vec())
            .err()
            .unwrap();
        assert!(err.contains("truncated"), "{err}");
        assert!(GgufFile::parse(b"GGML".to_vec()).is_err());
    }
}
