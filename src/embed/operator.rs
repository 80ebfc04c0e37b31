//! The embed operator: each epoch's vectors, on the worker that read its shard.
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use super::{EmbedConfig, SentenceEncoder};
use crate::error::Fail;
use crate::source::operator::{EpochDocs, LocalShards};
use crate::source::DocMeta;

/// What the embed operator needs of the job.
pub struct EmbedContext {
    pub embed: EmbedConfig,
    /// The column the encoder reads.
    pub text_column: String,
    /// The vectors' width.
    pub dim: usize,
    /// Encoder FLOPs and documents embedded in this run, added up over the process's workers.
    pub cost: Arc<Mutex<(f64, u64)>>,
    pub fail: Fail,
}

/// An epoch's documents with their unit vectors (row-major), from the embed operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EmbeddedEpoch {
    pub epoch: u64,
    pub docs: Vec<DocMeta>,
    pub vectors: Vec<f32>,
}

/// Embeds each epoch's documents on the worker that read the shard (its rows are there): the
/// precomputed column's vectors when the spec names one, else the sentence encoder's (one
/// encoder a worker, loaded at the first epoch that needs it).
pub fn embed_operator<'scope>(
    docs: StreamVec<'scope, u64, EpochDocs>,
    ctx: EmbedContext,
    local: &LocalShards,
) -> StreamVec<'scope, u64, EmbeddedEpoch> {
    let local = local.clone();
    docs.unary::<CapacityContainerBuilder<Vec<EmbeddedEpoch>>, _, _, _>(
        Pipeline,
        "Embed",
        move |_capability, _info| {
            let mut encoder: Option<SentenceEncoder> = None;
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    for container in data {
                        for epoch_docs in container.drain(..) {
                            let epoch = epoch_docs.epoch;
                            match embed_epoch(&ctx, &local, &mut encoder, epoch_docs) {
                                Ok(embedded) => output.session(&cap).give(embedded),
                                Err(e) => (ctx.fail)(e.context(format!("embedding epoch {epoch}"))),
                            }
                        }
                    }
                });
            }
        },
    )
}

fn embed_epoch(
    ctx: &EmbedContext,
    local: &LocalShards,
    encoder: &mut Option<SentenceEncoder>,
    epoch_docs: EpochDocs,
) -> Result<EmbeddedEpoch> {
    let dim = ctx.dim;
    let mut local = local.borrow_mut();
    let shard = local
        .get_mut(&epoch_docs.epoch)
        .with_context(|| format!("internal: epoch {} is not held here", epoch_docs.epoch))?;
    let Ok(data) = &mut shard.data else {
        // Quarantined: nothing to embed, but assign still sees the epoch.
        return Ok(EmbeddedEpoch {
            epoch: epoch_docs.epoch,
            ..Default::default()
        });
    };
    // The precomputed vectors leave the shard (only assign reads them): moved, not copied.
    let vectors = match data.vectors.take() {
        Some(vectors) => vectors,
        None => {
            if encoder.is_none() {
                let device = ctx.embed.tch_device().map_err(|e| anyhow::anyhow!(e))?;
                let loaded = SentenceEncoder::load(&ctx.embed.model, device, ctx.embed.max_tokens)
                    .with_context(|| {
                        format!(
                            "loading the encoder {}{}",
                            ctx.embed.model.display(),
                            ctx.embed.model_note()
                        )
                    })?;
                anyhow::ensure!(
                    loaded.dim() == dim,
                    "{}: the encoder gives vectors of width {}, embed.dim says {dim}",
                    ctx.embed.model.display(),
                    loaded.dim()
                );
                *encoder = Some(loaded);
            }
            let encoder = encoder.as_ref().expect("loaded above");
            let start = Instant::now();
            let texts = data.doc_texts(&ctx.text_column);
            let vectors = encoder.encode(&texts, ctx.embed.batch_size)?;
            let max = encoder.max_tokens() as u64;
            let flops = crate::cost::embed_flops(
                encoder.shape(),
                data.docs.iter().map(|d| u64::from(d.tokens).min(max)),
            );
            let mut cost = ctx.cost.lock().expect("embed cost");
            cost.0 += flops;
            cost.1 += texts.len() as u64;
            drop(cost);
            tracing::info!(
                shard = %shard.shard.display(),
                documents = texts.len(),
                docs_per_s = texts.len() as f64 / start.elapsed().as_secs_f64().max(1e-9),
                "embedded"
            );
            vectors.concat()
        }
    };
    Ok(EmbeddedEpoch {
        epoch: epoch_docs.epoch,
        // The same documents the read stage sent (`read_local`): this epoch's own copy.
        docs: epoch_docs.docs,
        vectors,
    })
}
