//! `quad score`: scores every document of a Parquet file with the job's influence model and
//! writes the scores (schemas/score.json).
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;

use crate::config::JobSpec;
use crate::influence::setup::{build_scorer, read_documents, FitPool};

/// Scores every document of `input` and writes `output` (schemas/score.json, zstd), and the
/// sketches when asked. Returns a one-line summary.
pub fn score_file(
    spec: &JobSpec,
    input: &Path,
    output: &Path,
    sketches: Option<&Path>,
    limit: Option<usize>,
) -> anyhow::Result<String> {
    if sketches.is_some() && spec.influence.sketch_dim.is_none() {
        anyhow::bail!("--sketches needs influence.sketch_dim in the job spec");
    }
    let started = std::time::Instant::now();
    let mut docs = read_documents(input, &spec.source)?;
    if let Some(n) = limit {
        docs.truncate(n);
    }
    let mut scorer = build_scorer(
        &spec.influence,
        &spec.source,
        FitPool::Glob(&spec.source.shards),
        spec.seed,
    )?;
    let mut scores = Vec::with_capacity(docs.len());
    let chunk = spec.influence.batch.max(1) * 4;
    for (i, part) in docs.chunks(chunk).enumerate() {
        let texts: Vec<&str> = part.iter().map(|(_, t)| t.as_str()).collect();
        scores.extend(scorer.score(&texts)?);
        tracing::info!(
            scored = (i * chunk + part.len()),
            of = docs.len(),
            "scoring"
        );
    }
    let ids = StringArray::from_iter_values(docs.iter().map(|(id, _)| id.as_str()));
    let tokens = Int64Array::from_iter_values(scores.iter().map(|s| s.tokens as i64));
    let influence: Float64Array = scores.iter().map(|s| s.value()).collect();
    let unscorable: StringArray = scores
        .iter()
        .map(|s| s.influence.as_ref().err().map(|reason| reason.to_string()))
        .collect();
    for ((id, _), s) in docs.iter().zip(&scores) {
        if let Err(reason) = &s.influence {
            tracing::warn!(id, %reason, "document not scored");
        }
    }
    let norm: Float64Array = scores.iter().map(|s| s.norm).collect();
    let schema = crate::schema::score_schema();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids),
        Arc::new(tokens),
        Arc::new(influence),
        Arc::new(norm),
        Arc::new(unscorable),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a file name", output.display()))?;
    crate::sink::write_durably(dir, name, schema, &[batch], &spec.sink)
        .with_context(|| format!("writing {}", output.display()))?;
    if let Some(path) = sketches {
        let rows: Vec<f32> = scores
            .iter()
            .flat_map(|s| s.sketch.clone().unwrap_or_default())
            .collect();
        let len = (rows.len() / scores.len().max(1)) as i64;
        let all = tch::Tensor::from_slice(&rows).reshape([scores.len() as i64, len]);
        let reference = tch::Tensor::from_slice(&scorer.reference_sketch().unwrap_or_default());
        tch::Tensor::write_safetensors(&[("sketches", &all), ("reference", &reference)], path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens: u64 = scores.iter().map(|s| s.tokens).sum();
    Ok(format!(
        "scored {} documents ({} tokens) in {:.1} s -> {}",
        scores.len(),
        tokens,
        secs,
        output.display()
    ))
}
