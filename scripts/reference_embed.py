#!/usr/bin/env python3
"""Independent reference for quad's BERT sentence encoder (src/embed/mod.rs).

Plain PyTorch + safetensors, no transformers and no tokenizers package: the BERT WordPiece
tokenizer is re-implemented here from vocab.txt and the forward pass from torch ops, one text
at a time (no padding, so no attention mask), in float64.

Usage: reference_embed.py MODEL_DIR MAX_TOKENS INPUT.json
INPUT.json: {"texts": [...]}  ->  stdout: {"ids": [[...]], "embeddings": [[...]]}
"""
import json
import math
import os
import sys
import unicodedata

import torch
from safetensors.torch import load_file


# ---------------------------------------------------------------- tokenizer (BERT uncased)
def is_control(ch):
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def is_whitespace(ch):
    if ch in " \t\n\r":
        return True
    return unicodedata.category(ch) == "Zs"


def is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPiece:
    def __init__(self, vocab_path, lowercase=True):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.lowercase = lowercase
        self.unk = self.vocab["[UNK]"]
        self.cls = self.vocab["[CLS]"]
        self.sep = self.vocab["[SEP]"]

    def normalize(self, text):
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or is_control(ch):
                continue
            if is_whitespace(ch):
                out.append(" ")
            elif is_cjk(cp):
                out.append(" " + ch + " ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:
            text = unicodedata.normalize("NFD", text)
            text = "".join(c for c in text if unicodedata.category(c) != "Mn")
            text = text.lower()
        return text

    def pre_tokenize(self, text):
        words = []
        for chunk in text.split():
            cur = ""
            for ch in chunk:
                if is_punctuation(ch):
                    if cur:
                        words.append(cur)
                        cur = ""
                    words.append(ch)
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def word_ids(self, word):
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end]
                if start > 0:
                    piece = "##" + piece
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text, max_tokens):
        ids = []
        for w in self.pre_tokenize(self.normalize(text)):
            ids.extend(self.word_ids(w))
        ids = ids[: max_tokens - 2]
        return [self.cls] + ids + [self.sep]


# ---------------------------------------------------------------- BERT forward
def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bert_forward(W, cfg, ids):
    eps = cfg.get("layer_norm_eps", 1e-12)
    heads = cfg["num_attention_heads"]
    t = len(ids)
    ids_t = torch.tensor(ids, dtype=torch.long)
    x = (
        W["embeddings.word_embeddings.weight"][ids_t]
        + W["embeddings.position_embeddings.weight"][:t]
        + W["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    hd = x.shape[-1] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(name, inp):
            return inp @ W[p + name + ".weight"].T + W[p + name + ".bias"]

        q = lin("attention.self.query", x).view(t, heads, hd).transpose(0, 1)
        k = lin("attention.self.key", x).view(t, heads, hd).transpose(0, 1)
        v = lin("attention.self.value", x).view(t, heads, hd).transpose(0, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        probs = torch.softmax(scores, dim=-1)
        ctx = (probs @ v).transpose(0, 1).reshape(t, heads * hd)
        a = layer_norm(
            lin("attention.output.dense", ctx) + x,
            W[p + "attention.output.LayerNorm.weight"],
            W[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = gelu_erf(lin("intermediate.dense", a))
        x = layer_norm(
            lin("output.dense", h) + a,
            W[p + "output.LayerNorm.weight"],
            W[p + "output.LayerNorm.bias"],
            eps,
        )
    return x


def main():
    model_dir, max_tokens, input_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    max_tokens = min(max_tokens, cfg["max_position_embeddings"])
    pooling = "mean"
    pool_path = os.path.join(model_dir, "1_Pooling", "config.json")
    if os.path.exists(pool_path):
        with open(pool_path) as f:
            pc = json.load(f)
        if pc.get("pooling_mode_cls_token"):
            pooling = "cls"
    raw = load_file(os.path.join(model_dir, "model.safetensors"))
    W = {}
    for name, t in raw.items():
        if name.startswith("bert."):
            name = name[len("bert."):]
        W[name] = t.to(torch.float64)
    tok = WordPiece(os.path.join(model_dir, "vocab.txt"))
    with open(input_path, encoding="utf-8") as f:
        texts = json.load(f)["texts"]
    all_ids, embs = [], []
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text, max_tokens)
            h = bert_forward(W, cfg, ids)
            e = h[0] if pooling == "cls" else h.mean(0)
            e = e / e.norm()
            all_ids.append(ids)
            embs.append(e.tolist())
    json.dump({"ids": all_ids, "embeddings": embs}, sys.stdout)


if __name__ == "__main__":
    main()
