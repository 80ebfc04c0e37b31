#!/usr/bin/env python3
"""Cross-check of `quad score` with `influence.convention = "kronfluence"` against Kronfluence
1.0.1 itself (scripts/check-kronfluence.sh runs it; not part of `make test`).

`prepare WORK TOKENIZER` writes a tiny random Llama (transformers' LlamaForCausalLM, 2 layers,
d 64, GQA 4/2 heads) as a Hugging Face directory, 30 reference and 200 candidate documents as
Parquet, and two job specs (K-FAC and EK-FAC; empirical Fisher, separate Q/K/V, float64).
`compare WORK` runs Kronfluence on the same model and documents (the factors fitted on the
reference documents plus the candidates, as `quad score` fits them when its pool sample is the
whole candidate file; pairwise scores with the reference documents as queries) and compares
the mean over queries with quad's `influence` column: the relative L2 error and Spearman's rank
correlation, one JSON line per preconditioner. Exits 1 when an error is above 1e-5.
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

TOLERANCE = 1e-5
WORDS = (
    "the river rose in spring and the town council met to plan a new bridge over the water "
    "while markets opened early farmers sold grain prices fell sharply after the storm "
    "scientists measured the temperature of the lake and found it warmer than last year "
    "the team won the final match with a late goal children played in the park at noon"
).split()


def write_texts(path, texts, prefix):
    ids = [f"{prefix}{i}" for i in range(len(texts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts}), path)


def job_spec(work, preconditioner):
    return f"""name = "kronfluence-check-{preconditioner}"
seed = 1

[source]
shards = "{work}/pool/*.parquet"
id_column = "id"
text_column = "text"

[influence]
model = "{work}/model"
device = "cpu"
dtype = "f64"
window = 64
batch = 8
preconditioner = "{preconditioner}"
convention = "kronfluence"
fisher = "empirical"
qkv = "separate"
gate_up = "separate"
reference = "{work}/reference.parquet"
fit_pool_docs = 1000
factor_cache = "{work}/factors"

[sink]
path = "{work}/out"
"""


def prepare(work, tokenizer_path):
    rng = random.Random(7)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))

    write_texts(work / "reference.parquet", [text() for _ in range(30)], "r")
    write_texts(work / "pool" / "part-0.parquet", [text() for _ in range(200)], "c")
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # N(0, 0.02) weights predict nearly uniformly; a larger scale gives gradients that matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    model.save_pretrained(work / "model", safe_serialization=True)
    # The asset pads and truncates every text to 128 ids; here a document is its own ids.
    tokenizer = json.loads(Path(tokenizer_path).read_text())
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    (work / "model" / "tokenizer.json").write_text(json.dumps(tokenizer))
    for p in ("kfac", "ekfac"):
        (work / f"{p}.toml").write_text(job_spec(work, p))


class DocumentLoss:
    """The Kronfluence task of the convention: each document's mean next-token NLL (padding
    labels -100), summed over the batch; the attention mask; the projections quad tracks."""

    def __init__(self, layers):
        self.layers = layers

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].double()
        labels = batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                probs = logits.softmax(-1).reshape(-1, logits.size(-1))
                drawn = torch.multinomial(probs, 1).reshape(labels.shape)
            labels = torch.where(labels == -100, labels, drawn)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none", ignore_index=-100
        ).reshape(labels.shape)
        counts = (labels != -100).sum(1)
        return (nll.sum(1) / counts).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        names = []
        for i in range(self.layers):
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
                names.append(f"model.layers.{i}.{m}")
            for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                names.append(f"model.layers.{i}.{m}")
        return names

    def get_attention_mask(self, batch):
        return batch["attention_mask"]

    def post_process_per_sample_gradient(self, module_name, gradient):
        return gradient


def collate(rows):
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(r)] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def spearman(x, y):
    rx = np.argsort(np.argsort(x))
    ry = np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def kronfluence_scores(work, strategy, reference, candidates):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class LmTask(DocumentLoss, Task):
        pass

    model = LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float64, attn_implementation="eager")
    model.eval()
    task = LmTask(model.config.num_hidden_layers)
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name=f"quad-{strategy}", model=model, task=task, cpu=True, disable_tqdm=True,
        output_dir=str(work / "kronfluence"),
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    analyzer.fit_all_factors(
        factors_name=strategy, dataset=reference + candidates, per_device_batch_size=8,
        factor_args=factor_args, overwrite_output_dir=True,
    )
    score_args = ScoreArguments(
        damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64,
    )
    analyzer.compute_pairwise_scores(
        scores_name=strategy, factors_name=strategy, query_dataset=reference,
        train_dataset=candidates, per_device_query_batch_size=8, per_device_train_batch_size=8,
        score_args=score_args, overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores(strategy)["all_modules"]
    return scores.double().mean(0).numpy()


def compare(work):
    torch.set_num_threads(2)
    tok = Tokenizer.from_file(str(work / "model" / "tokenizer.json"))

    def encode(path):
        texts = pq.read_table(path).column("text").to_pylist()
        return [tok.encode(t, add_special_tokens=True).ids for t in texts]

    reference = encode(work / "reference.parquet")
    candidates = encode(work / "pool" / "part-0.parquet")
    worst = 0.0
    for quad_name, strategy in (("kfac", "kfac"), ("ekfac", "ekfac")):
        quad = np.array(pq.read_table(work / f"scores-{quad_name}.parquet").column("influence").to_pylist())
        kron = kronfluence_scores(work, strategy, reference, candidates)
        error = float(np.linalg.norm(quad - kron) / np.linalg.norm(kron))
        worst = max(worst, error)
        print(json.dumps({
            "preconditioner": quad_name, "documents": len(kron), "relative_l2": error,
            "spearman": spearman(quad, kron), "quad_rms": float(np.sqrt(np.mean(quad ** 2))),
            "kronfluence_rms": float(np.sqrt(np.mean(kron ** 2))),
        }))
    return 0 if worst <= TOLERANCE else 1


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "compare":
        return compare(Path(sys.argv[2]).resolve())
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
