#!/usr/bin/env python3
"""Independent reference for quad's causal LM (src/model): transformers' LlamaForCausalLM and
tokenizer, loaded from the same GGUF file (transformers dequantises it with the `gguf` package
and converts the tokenizer itself) or from a Hugging Face directory.

Prints one JSON object: token ids of the prompt and the paragraph, the greedy continuation of
the prompt (ids and text), the paragraph's mean next-token NLL and perplexity, and optionally
the logits of given ids (for exact comparisons on small models).

Usage: reference_lm.py MODEL (dir or .gguf) --prompt TEXT --paragraph TEXT [--new-tokens N]
       [--logits-ids 1,2,3]
Install: scripts/setup-torch.sh (torch==2.11.0, transformers, gguf).
"""
import argparse
import json
import math
import os

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--paragraph", default="")
    ap.add_argument("--new-tokens", type=int, default=5)
    ap.add_argument("--logits-ids", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(args.model))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = LlamaForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    out = {}
    with torch.no_grad():
        if args.prompt:
            ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
            out["prompt_ids"] = ids
            cur = list(ids)
            for _ in range(args.new_tokens):
                logits = model(torch.tensor([cur])).logits[0, -1]
                cur.append(int(logits.argmax()))
            new = cur[len(ids):]
            out["greedy_ids"] = new
            out["greedy_text"] = tok.decode(new)
        if args.paragraph:
            ids = tok(args.paragraph, add_special_tokens=True)["input_ids"]
            out["paragraph_ids"] = ids
            t = torch.tensor([ids])
            logits = model(t).logits[0].double()
            nll = torch.nn.functional.cross_entropy(logits[:-1], t[0, 1:]).item()
            out["paragraph_nll"] = nll
            out["paragraph_ppl"] = math.exp(nll)
        if args.logits_ids:
            ids = [int(x) for x in args.logits_ids.split(",")]
            out["logits"] = model(torch.tensor([ids])).logits[0].tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
