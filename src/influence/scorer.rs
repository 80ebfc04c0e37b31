//! Runs the model for influence: fitting the factors (true or empirical Fisher), the reference
//! gradient, and `InfluenceScorer`, which scores batches of documents with one forward and
//! one backward pass each.
//!
//! Windows: a document of n tokens is cut into windows of at most L tokens that overlap by
//! one token, so each of its n - 1 next-token predictions is made exactly once. The document's
//! loss is the mean over all of them, i.e. the token-weighted mean of its windows' mean losses,
//! and its score is the same token-weighted mean of the windows' scores (DESIGN 1.3).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::factors::{BlockLayout, CovarianceAccumulator, Damping, EkfacAccumulator, KfacFactors};
use super::score::{bilinear_scores, gradient_sq_norm, token_gradient, NormMethod};
use super::sketch::KroneckerSketch;
use super::{Convention, Fisher, InfluenceError, Preconditioner, Stacking};
use crate::model::{BlockKind, CausalLm, TrackedLinear};

pub fn parse_kind(dtype: &str) -> Result<Kind, String> {
    match dtype {
        "f32" | "float32" => Ok(Kind::Float),
        "f64" | "float64" => Ok(Kind::Double),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        other => Err(format!(
            "influence.dtype must be f32, f64, bf16 or f16, got {other:?}"
        )),
    }
}

pub fn parse_device(device: &str) -> Result<Device, String> {
    match device {
        "auto" => Ok(crate::model::auto_device()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| {
                format!("influence.device must be auto, cpu, cuda or cuda:N, got {other:?}")
            }),
    }
}

/// The K-FAC blocks of a model's tracked linear layers: each fused projection is one block or
/// one block per part, as `qkv` and `gate_up` say; o and down are one block each.
pub fn block_layouts(
    tracked: &[TrackedLinear],
    qkv: Stacking,
    gate_up: Stacking,
) -> Vec<BlockLayout> {
    let mut blocks = Vec::new();
    for (l, t) in tracked.iter().enumerate() {
        let cols = t.input.size()[2];
        let d_out: i64 = t.split.iter().sum();
        let separate = match t.kind {
            BlockKind::Qkv => qkv == Stacking::Separate,
            BlockKind::GateUp => gate_up == Stacking::Separate,
            BlockKind::AttnOut | BlockKind::Down => false,
        };
        if separate && t.split.len() > 1 {
            let names: &[&str] = match t.kind {
                BlockKind::Qkv => &["q", "k", "v"],
                _ => &["gate", "up"],
            };
            let mut offset = 0;
            for (i, &rows) in t.split.iter().enumerate() {
                let part = names.get(i).copied().unwrap_or("part");
                blocks.push(BlockLayout {
                    name: format!("{}.{part}", t.name),
                    linear: l,
                    row_offset: offset,
                    rows,
                    cols,
                });
                offset += rows;
            }
        } else {
            blocks.push(BlockLayout {
                name: t.name.clone(),
                linear: l,
                row_offset: 0,
                rows: d_out,
                cols,
            });
        }
    }
    blocks
}

/// Token windows of a set of documents.
#[derive(Debug, Clone)]
pub struct Windows {
    /// Token ids of each window.
    pub rows: Vec<Vec<i64>>,
    /// The document each window belongs to.
    pub row_doc: Vec<usize>,
    /// Next-token predictions per document (over all its windows).
    pub predictions: Vec<usize>,
}

impl Windows {
    pub fn new(docs: &[Vec<i64>], window: usize) -> Windows {
        let window = window.max(2);
        let mut w = Windows {
            rows: Vec::new(),
            row_doc: Vec::new(),
            predictions: Vec::with_capacity(docs.len()),
        };
        for (d, ids) in docs.iter().enumerate() {
            w.predictions.push(ids.len().saturating_sub(1));
            let mut start = 0;
            while start + 1 < ids.len() {
                let end = (start + window).min(ids.len());
                w.rows.push(ids[start..end].to_vec());
                w.row_doc.push(d);
                start = end - 1;
            }
        }
        w
    }

    /// Consecutive ranges of at most `batch` windows, cutting documents where they fall: what
    /// fitting and scoring run through the model, so memory is bounded whatever a document's
    /// length.
    pub fn chunks(&self, batch: usize) -> Vec<std::ops::Range<usize>> {
        let batch = batch.max(1);
        (0..self.rows.len())
            .step_by(batch)
            .map(|start| start..(start + batch).min(self.rows.len()))
            .collect()
    }

    /// Whether window `row` is the first (`first`) or the last of its document.
    fn ends_document(&self, row: usize, first: bool) -> bool {
        let doc = self.row_doc[row];
        let neighbour = if first {
            row.checked_sub(1)
        } else {
            Some(row + 1)
        };
        neighbour.and_then(|r| self.row_doc.get(r)) != Some(&doc)
    }
}

/// Which next tokens the loss of a pass is taken against.
pub enum Targets<'r> {
    /// The documents' own tokens.
    Data,
    /// Tokens sampled from the model's predictive distribution (true Fisher); the uniforms
    /// come from this stream, so a seed fixes the labels.
    Sampled(&'r mut ChaCha8Rng),
}

/// One forward and one backward pass over windows `rows` (right-padded). The loss is
/// sum_rows weight[row] x sum_t nll_t over the row's predictions. Returns per tracked linear
/// (a [B, T, d_in], g [B, T, d_out]) and the mask [B, T] of positions with a prediction.
pub fn capture(
    model: &CausalLm,
    rows: &[Vec<i64>],
    weights: &[f64],
    targets: Targets,
) -> Result<(Vec<(Tensor, Tensor)>, Tensor), InfluenceError> {
    let device = model.device();
    let len = rows.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let b = rows.len() as i64;
    let mut ids = vec![0i64; (b * len) as usize];
    let mut mask = vec![0f64; (b * len) as usize];
    for (r, row) in rows.iter().enumerate() {
        let base = r * len as usize;
        ids[base..base + row.len()].copy_from_slice(row);
        for m in &mut mask[base..base + row.len() - 1] {
            *m = weights[r];
        }
    }
    let ids = Tensor::from_slice(&ids).reshape([b, len]).to_device(device);
    let mask_weights = Tensor::from_slice(&mask)
        .reshape([b, len])
        .to_device(device);
    let (logits, tracked) = model.model.forward_tracked(&ids);
    let loss_kind = if logits.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let logp = logits.narrow(1, 0, len - 1).log_softmax(-1, loss_kind);
    let next = match targets {
        Targets::Data => ids.narrow(1, 1, len - 1),
        Targets::Sampled(rng) => tch::no_grad(|| {
            // Inverse-CDF sampling with seeded uniforms: deterministic on every device.
            let u: Vec<f64> = (0..b * (len - 1)).map(|_| rng.random::<f64>()).collect();
            let u = Tensor::from_slice(&u)
                .reshape([b, len - 1, 1])
                .to_device(device)
                .to_kind(loss_kind);
            let cdf = logp.detach().exp().cumsum(-1, loss_kind);
            let vocab = cdf.size()[2];
            cdf.lt_tensor(&u)
                .sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64)
                .clamp_max(vocab - 1)
        }),
    };
    let nll = -logp.gather(2, &next.unsqueeze(-1), false).squeeze_dim(-1);
    let w = mask_weights.narrow(1, 0, len - 1).to_kind(loss_kind);
    let loss = (nll * &w).sum(loss_kind);
    let outputs: Vec<&Tensor> = tracked.iter().map(|t| &t.output).collect();
    let grads = Tensor::f_run_backward(&[&loss], &outputs, false, false)?;
    let captures = tracked
        .into_iter()
        .zip(grads)
        .map(|(t, g)| (t.input.detach(), g))
        .collect();
    Ok((captures, mask_weights.ne(0.0)))
}

/// What `fit_factors` needs to know.
#[derive(Debug, Clone)]
pub struct FitSettings {
    pub fisher: Fisher,
    pub convention: Convention,
    pub qkv: Stacking,
    pub gate_up: Stacking,
    pub ekfac: bool,
    pub window: usize,
    pub batch: usize,
    pub seed: u64,
}

/// The tokens of a capture at the positions `mask` marks, flattened: (a [N, d_in], g [N, d_out]).
fn masked_tokens(captures: &[(Tensor, Tensor)], mask: &Tensor) -> Vec<(Tensor, Tensor)> {
    let idx = mask.flatten(0, 1).nonzero().squeeze_dim(1);
    captures
        .iter()
        .map(|(a, g)| {
            (
                a.flatten(0, 1).index_select(0, &idx),
                g.flatten(0, 1).index_select(0, &idx),
            )
        })
        .collect()
}

/// The loss weight of each window of a fitting batch: 1 per predicted token (quad: g_t is the
/// gradient of the token's own loss, a window's gradient that of its summed loss), or 1 over the
/// window's predictions (Kronfluence: the gradient of the example's mean loss).
fn fit_weights(rows: &[Vec<i64>], convention: Convention) -> Vec<f64> {
    rows.iter()
        .map(|row| match convention {
            Convention::Quad => 1.0,
            Convention::Kronfluence => 1.0 / (row.len() - 1) as f64,
        })
        .collect()
}

/// [B, T] true at every input position of `rows` (right-padded to T): what Kronfluence
/// averages A and G over (the attention mask), a window's last token included.
fn input_positions(rows: &[Vec<i64>], device: Device) -> Tensor {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mask: Vec<bool> = rows
        .iter()
        .flat_map(|row| (0..len).map(move |t| t < row.len()))
        .collect();
    Tensor::from_slice(&mask)
        .reshape([rows.len() as i64, len as i64])
        .to_device(device)
}

/// What a fitting pass calls per batch: the captures and the mask of the counted positions.
type BatchVisitor<'v> = dyn FnMut(&[(Tensor, Tensor)], &Tensor) -> Result<(), InfluenceError> + 'v;

/// One pass over the fitting windows, batch by batch: `visit` gets each batch's captures
/// ([B, T, d] per tracked linear) and the mask of the positions A and G average over. Every
/// pass re-seeds, so the EK-FAC pass sees the labels the covariances were fitted on.
fn fit_pass(
    model: &CausalLm,
    windows: &Windows,
    settings: &FitSettings,
    visit: &mut BatchVisitor<'_>,
) -> Result<(), InfluenceError> {
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed ^ 0xf15e_u64);
    let chunks = windows.chunks(settings.batch);
    for (i, range) in chunks.iter().enumerate() {
        let rows = &windows.rows[range.clone()];
        let targets = match settings.fisher {
            Fisher::True => Targets::Sampled(&mut rng),
            Fisher::Empirical => Targets::Data,
        };
        let weights = fit_weights(rows, settings.convention);
        let (captures, predicted) = capture(model, rows, &weights, targets)?;
        let counted = match settings.convention {
            Convention::Quad => predicted,
            Convention::Kronfluence => input_positions(rows, model.device()),
        };
        tch::no_grad(|| visit(&captures, &counted))?;
        tracing::debug!(batch = i + 1, of = chunks.len(), "factor pass");
    }
    Ok(())
}

/// Fits A and G (and the EK-FAC eigenvalues) on the windows of `docs`, as the settings'
/// convention defines them.
pub fn fit_factors(
    model: &CausalLm,
    docs: &[Vec<i64>],
    settings: &FitSettings,
) -> Result<KfacFactors, InfluenceError> {
    let windows = Windows::new(docs, settings.window);
    if windows.rows.is_empty() {
        return Err(InfluenceError::Fit("no document has two tokens".into()));
    }
    let mut acc = CovarianceAccumulator::new(&layouts_for(model, settings)?);
    fit_pass(model, &windows, settings, &mut |captures, counted| {
        acc.add(&masked_tokens(captures, counted));
        Ok(())
    })?;
    let mut factors = acc.finish()?;
    tracing::info!(
        tokens = factors.tokens,
        blocks = factors.blocks.len(),
        "K-FAC factors fitted"
    );
    if settings.ekfac {
        let mut ek = EkfacAccumulator::new(&factors);
        fit_pass(model, &windows, settings, &mut |captures, _| {
            ek.add_examples(captures);
            Ok(())
        })?;
        let eigenvalues = ek.finish()?;
        factors.set_ekfac(eigenvalues);
        tracing::info!(examples = windows.rows.len(), "EK-FAC eigenvalues fitted");
    }
    Ok(factors)
}

/// The block layouts of a model, from a tracked pass over two tokens.
pub fn layouts_for(
    model: &CausalLm,
    settings: &FitSettings,
) -> Result<Vec<BlockLayout>, InfluenceError> {
    let ids = Tensor::from_slice(&[0i64, 0])
        .reshape([1, 2])
        .to_device(model.device());
    let (_, tracked) = tch::no_grad(|| model.model.forward_tracked(&ids));
    Ok(block_layouts(&tracked, settings.qkv, settings.gate_up))
}

/// v = mean over the reference documents of grad L(r), per tracked linear ([d_out, d_in],
/// float64).
pub struct ReferenceGradient {
    pub grads: Vec<Tensor>,
    pub docs: usize,
}

impl ReferenceGradient {
    pub fn compute(
        model: &CausalLm,
        docs: &[Vec<i64>],
        window: usize,
        batch: usize,
    ) -> Result<ReferenceGradient, InfluenceError> {
        let windows = Windows::new(docs, window);
        let used = windows.predictions.iter().filter(|&&n| n > 0).count();
        if used == 0 {
            return Err(InfluenceError::Fit(
                "no reference document has two tokens".into(),
            ));
        }
        let mut sums: Vec<Tensor> = Vec::new();
        // Linear in the windows, so a document may be cut across batches.
        for range in windows.chunks(batch) {
            let weights: Vec<f64> = range
                .clone()
                .map(|r| 1.0 / (windows.predictions[windows.row_doc[r]] as f64 * used as f64))
                .collect();
            let (captures, _) = capture(model, &windows.rows[range], &weights, Targets::Data)?;
            tch::no_grad(|| {
                for (l, (a, g)) in captures.iter().enumerate() {
                    let grad = token_gradient(&a.to_kind(Kind::Double), &g.to_kind(Kind::Double));
                    match sums.get_mut(l) {
                        Some(s) => *s += grad,
                        None => sums.push(grad),
                    }
                }
            });
        }
        Ok(ReferenceGradient {
            grads: sums,
            docs: used,
        })
    }
}

/// How the scorer scores.
#[derive(Debug, Clone)]
pub struct ScorerSettings {
    pub preconditioner: Preconditioner,
    pub damping: Damping,
    pub window: usize,
    pub batch: usize,
    pub normalise: bool,
    /// Side of the Kronecker sketch; no sketches when None.
    pub sketch_dim: Option<i64>,
    /// Score only the first N tokens of each document.
    pub max_tokens: Option<usize>,
    pub seed: u64,
}

/// Why a document has no influence score. Decided here, once, for every caller: the loop
/// records the reason and never selects the document on a score, `quad score` writes a null.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unscorable {
    /// Fewer than two tokens: no next-token prediction, so no loss and no gradient.
    #[error("{tokens} token(s): nothing to predict, so no influence")]
    TooShort { tokens: u64 },
    /// The score came out NaN or infinite (a diverged model, an overflow in low precision).
    #[error("influence is not finite ({0})")]
    NotFinite(f64),
    /// The values could not be read back from the device.
    #[error("reading the score back from the device: {0}")]
    Conversion(String),
}

/// One document's score.
#[derive(Debug, Clone, PartialEq)]
pub struct DocScore {
    /// Tokens of the document (all windows).
    pub tokens: u64,
    /// v^T H^-1 grad L(z), divided by `norm` when normalising, or why there is none. Positive:
    /// a step on the document lowers the reference loss.
    pub influence: Result<f64, Unscorable>,
    /// ||grad L(z)|| when normalising.
    pub norm: Option<f64>,
    /// The Kronecker sketch of grad L(z) (s^2 per tracked linear) when sketching.
    pub sketch: Option<Vec<f32>>,
}

impl DocScore {
    /// The influence, when the document could be scored.
    pub fn value(&self) -> Option<f64> {
        self.influence.as_ref().ok().copied()
    }
}

/// Sums of one document's parts while its windows go through the model batch by batch.
struct Partial {
    influence: f64,
    sq_norm: f64,
    sketch: Option<Vec<f32>>,
    failure: Option<Unscorable>,
}

/// The running sums of a `score_tokens` call. A document cut across batches keeps its weight
/// gradient sum_t g_t a_t^T per tracked linear (`open`) until its last window, so its norm
/// needs no window's activations after that window's batch: memory is one gradient, whatever
/// the document's length. At most one document is open at a time (batches are consecutive).
struct ScoreSums {
    docs: Vec<Partial>,
    open: Option<(usize, Vec<Tensor>)>,
}

impl ScoreSums {
    fn new(n: usize, sketch_len: Option<usize>) -> ScoreSums {
        ScoreSums {
            docs: (0..n)
                .map(|_| Partial {
                    influence: 0.0,
                    sq_norm: 0.0,
                    sketch: sketch_len.map(|len| vec![0.0; len]),
                    failure: None,
                })
                .collect(),
            open: None,
        }
    }

    fn fail(&mut self, doc: usize, reason: Unscorable) {
        self.docs[doc].failure.get_or_insert(reason);
    }

    /// Adds one segment's per-linear weight gradients to the open document's; returns the
    /// squared norm of the whole when `last` (the document's last window is in the segment).
    fn add_open(&mut self, doc: usize, grads: Vec<Tensor>, last: bool) -> Option<f64> {
        match self.open.as_mut() {
            Some((d, sums)) if *d == doc => {
                for (s, g) in sums.iter_mut().zip(grads) {
                    *s += g;
                }
            }
            _ => self.open = Some((doc, grads)),
        }
        if !last {
            return None;
        }
        let (_, sums) = self.open.take()?;
        Some(
            sums.iter()
                .map(|s| s.square().sum(Kind::Double).double_value(&[]))
                .sum(),
        )
    }

    /// The scores: too short, failed, normalised, then checked to be finite.
    fn finish(self, docs: &[Vec<i64>], normalise: bool) -> Vec<DocScore> {
        self.docs
            .into_iter()
            .zip(docs)
            .map(|(p, doc)| {
                let tokens = doc.len() as u64;
                let norm = normalise.then(|| p.sq_norm.sqrt());
                let influence = match (tokens, p.failure) {
                    (0 | 1, _) => Err(Unscorable::TooShort { tokens }),
                    (_, Some(reason)) => Err(reason),
                    (_, None) => match norm {
                        Some(n) if n > 0.0 => Ok(p.influence / n),
                        _ => Ok(p.influence),
                    },
                };
                let influence = influence.and_then(|v| {
                    if v.is_finite() {
                        Ok(v)
                    } else {
                        Err(Unscorable::NotFinite(v))
                    }
                });
                DocScore {
                    tokens,
                    influence,
                    norm,
                    sketch: p.sketch,
                }
            })
            .collect()
    }
}

/// Scores documents against a preconditioned reference gradient.
pub struct InfluenceScorer {
    model: CausalLm,
    /// M_l per tracked linear, in the model's kind, on its device.
    preconditioned: Vec<Tensor>,
    settings: ScorerSettings,
    sketch: Option<KroneckerSketch>,
}

impl InfluenceScorer {
    /// `factors` may be None only with the identity preconditioner.
    pub fn new(
        model: CausalLm,
        factors: Option<&KfacFactors>,
        reference: &ReferenceGradient,
        settings: ScorerSettings,
    ) -> Result<InfluenceScorer, InfluenceError> {
        let kind = model.model_kind();
        let device = model.device();
        let m = match (settings.preconditioner, factors) {
            (Preconditioner::Identity, _) => {
                reference.grads.iter().map(|g| g.shallow_clone()).collect()
            }
            (p, Some(f)) => f.precondition_all(
                &reference.grads,
                settings.damping,
                p == Preconditioner::Ekfac,
            )?,
            (p, None) => {
                return Err(InfluenceError::Settings(format!(
                    "the {p:?} preconditioner needs fitted factors"
                )))
            }
        };
        let preconditioned: Vec<Tensor> = m
            .iter()
            .map(|t| t.to_kind(kind).to_device(device))
            .collect();
        let sketch = settings.sketch_dim.map(|s| {
            let shapes: Vec<(i64, i64)> = preconditioned
                .iter()
                .map(|m| (m.size()[0], m.size()[1]))
                .collect();
            KroneckerSketch::new(&shapes, s, settings.seed, device, Kind::Float)
        });
        Ok(InfluenceScorer {
            model,
            preconditioned,
            settings,
            sketch,
        })
    }

    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// Gives the model back (e.g. to build a scorer with other settings).
    pub fn into_model(self) -> CausalLm {
        self.model
    }

    /// The preconditioned reference gradient M_l of each tracked linear.
    pub fn preconditioned(&self) -> &[Tensor] {
        &self.preconditioned
    }

    pub fn settings(&self) -> &ScorerSettings {
        &self.settings
    }

    /// The sketch of the preconditioned reference gradient: a document's influence is about
    /// the dot product of its sketch with this one.
    pub fn reference_sketch(&self) -> Option<Vec<f32>> {
        let sketch = self.sketch.as_ref()?;
        let parts: Vec<Tensor> = self
            .preconditioned
            .iter()
            .enumerate()
            .map(|(l, m)| sketch.sketch_matrix(l, m).flatten(0, 1))
            .collect();
        Vec::<f32>::try_from(
            Tensor::cat(&parts, 0)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        )
        .ok()
    }

    /// Scores texts (tokenised with the model's tokenizer).
    pub fn score(&mut self, texts: &[&str]) -> Result<Vec<DocScore>, InfluenceError> {
        let docs = texts
            .iter()
            .map(|t| {
                let mut ids = self.model.encode(t)?;
                ids.truncate(self.settings.max_tokens.unwrap_or(usize::MAX));
                Ok(ids)
            })
            .collect::<Result<Vec<_>, InfluenceError>>()?;
        self.score_tokens(&docs)
    }

    /// Scores token sequences: one forward and backward per batch of at most `batch` windows
    /// (a long document's windows go through several), each document's parts summed across
    /// batches. A document that cannot be scored gets the reason instead of a score.
    pub fn score_tokens(&mut self, docs: &[Vec<i64>]) -> Result<Vec<DocScore>, InfluenceError> {
        let windows = Windows::new(docs, self.settings.window);
        let mut sums = ScoreSums::new(docs.len(), self.sketch.as_ref().map(|s| s.len()));
        for range in windows.chunks(self.settings.batch) {
            let weights: Vec<f64> = windows.row_doc[range.clone()]
                .iter()
                .map(|&d| 1.0 / windows.predictions[d] as f64)
                .collect();
            let rows = &windows.rows[range.clone()];
            let (captures, _) = capture(&self.model, rows, &weights, Targets::Data)?;
            tch::no_grad(|| self.accumulate_batch(&captures, &windows, range, &mut sums));
        }
        Ok(sums.finish(docs, self.settings.normalise))
    }

    /// Adds one batch (windows `range`) to the sums: each row's bilinear score to its
    /// document's influence, and per document segment its norm and sketch parts.
    fn accumulate_batch(
        &self,
        captures: &[(Tensor, Tensor)],
        windows: &Windows,
        range: std::ops::Range<usize>,
        sums: &mut ScoreSums,
    ) {
        let row_doc = &windows.row_doc[range.clone()];
        let mut per_row =
            Tensor::zeros([row_doc.len() as i64], (Kind::Double, self.model.device()));
        for ((a, g), m) in captures.iter().zip(&self.preconditioned) {
            per_row += bilinear_scores(a, g, m);
        }
        match Vec::<f64>::try_from(per_row.to_device(Device::Cpu)) {
            Ok(values) => {
                for (v, &d) in values.iter().zip(row_doc) {
                    sums.docs[d].influence += v;
                }
            }
            Err(e) => {
                for &d in row_doc {
                    sums.fail(d, Unscorable::Conversion(e.to_string()));
                }
            }
        }
        if !self.settings.normalise && self.sketch.is_none() {
            return;
        }
        // Rows of one document are contiguous in a batch: take each document's segment.
        let mut start = 0;
        while start < row_doc.len() {
            let d = row_doc[start];
            let n = row_doc[start..].iter().take_while(|&&x| x == d).count();
            let (first, last) = (range.start + start, range.start + start + n - 1);
            let segment: Vec<(Tensor, Tensor)> = captures
                .iter()
                .map(|(a, g)| {
                    let cut = |t: &Tensor| t.narrow(0, start as i64, n as i64).flatten(0, 1);
                    (cut(a), cut(g))
                })
                .collect();
            let whole = windows.ends_document(first, true) && windows.ends_document(last, false);
            self.add_segment(&segment, d, whole, windows.ends_document(last, false), sums);
            start += n;
        }
    }

    /// One document's segment of a batch ((a, g) per tracked linear, [n, d]): its squared
    /// norm (through the Gram matrices when the segment is the whole document, else through
    /// the document's open gradient) and its sketch.
    fn add_segment(
        &self,
        segment: &[(Tensor, Tensor)],
        doc: usize,
        whole: bool,
        last: bool,
        sums: &mut ScoreSums,
    ) {
        if self.settings.normalise {
            if whole {
                sums.docs[doc].sq_norm = segment
                    .iter()
                    .map(|(a, g)| gradient_sq_norm(a, g, NormMethod::Auto))
                    .sum();
            } else {
                let grads = segment
                    .iter()
                    .map(|(a, g)| {
                        token_gradient(&a.to_kind(Kind::Double), &g.to_kind(Kind::Double))
                    })
                    .collect();
                if let Some(sq) = sums.add_open(doc, grads, last) {
                    sums.docs[doc].sq_norm = sq;
                }
            }
        }
        let Some(sketch) = &self.sketch else {
            return;
        };
        let parts: Vec<Tensor> = segment
            .iter()
            .enumerate()
            .map(|(l, (a, g))| sketch.sketch_tokens(l, a, g).flatten(0, 1))
            .collect();
        let values = Vec::<f32>::try_from(
            Tensor::cat(&parts, 0)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        );
        match (values, sums.docs[doc].sketch.as_mut()) {
            (Ok(v), Some(s)) => {
                for (x, y) in s.iter_mut().zip(v) {
                    *x += y;
                }
            }
            (Err(e), _) => sums.fail(doc, Unscorable::Conversion(e.to_string())),
            (Ok(_), None) => {}
        }
    }

    /// FLOPs to score one token with windows of `window` tokens, counted from the shapes:
    /// the forward pass (every projection, attention scores and values, the LM head), the
    /// backward pass to the tracked outputs (about the same again: input gradients only, no
    /// weight gradients), and the scoring product (one d_out x d_in product per projection).
    /// The norm's Gram matrices and sketches are not counted.
    pub fn flops_per_token(&self, window: usize) -> f64 {
        flops_per_token(&self.model.config, window)
    }
}

/// See `InfluenceScorer::flops_per_token`.
pub fn flops_per_token(cfg: &crate::model::LlamaConfig, window: usize) -> f64 {
    let d = cfg.hidden_size as f64;
    let hd = cfg.head_dim() as f64;
    let qkv: f64 = cfg.qkv_split().iter().sum::<i64>() as f64;
    let attn_width = cfg.num_attention_heads as f64 * hd;
    let ff = cfg.intermediate_size as f64;
    let linear = qkv * d + attn_width * d + 2.0 * ff * d + ff * d;
    // Causal attention: on average each token attends to (window + 1) / 2 positions, for the
    // scores (q . k) and the weighted values.
    let attention = 2.0 * 2.0 * attn_width * (window as f64 + 1.0) / 2.0;
    let head = 2.0 * d * cfg.vocab_size as f64;
    let layers = cfg.num_hidden_layers as f64;
    let forward = layers * (2.0 * linear + attention) + head;
    let backward = forward;
    let scoring = layers * 2.0 * linear;
    forward + backward + scoring
}
