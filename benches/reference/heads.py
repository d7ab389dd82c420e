#!/usr/bin/env python3
"""PyTorch reference for `loupe bench heads`: head detector scores and single-head zero ablations of
every head, done the way a TransformerLens user does them, on the same tokens as Loupe.

    ~/.cache/loupe/pyenv/bin/python benches/reference/heads.py \
        --model ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf --tokens tokens.json --threads 2

`loupe bench heads` runs this script itself (the venv comes from benches/reference/setup-env.sh) and
writes the token file: {"repeat_len": |R|, "repeated": [[BOS] + R + R, ...], "text": [[id, ...], ...]}.
The model is loaded as tests/fixtures/regen.py loads it (AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32), eager attention so that the patterns can be returned), with
torch.set_num_threads(--threads).

The work, with the definitions of tests/fixtures/heads_ref.py (TransformerLens' `detect_head` "mul"
with its defaults, and the induction stripe):
  detectors   one forward of the repeated batch returning every layer's pattern
              (`output_attentions=True`, as `run_with_cache` keeps `hook_pattern`), then the
              induction stripe and the induction, previous-token and duplicate-token "mul" scores of
              every head; one forward per text sequence (their lengths may differ) for the `_text`
              scores.
  ablations   the clean forward of the repeated batch, then one full forward per head (72 for Gemma 3
              270M) with a forward pre-hook on the attention's output projection that zeroes the
              head's slice of its input (`blocks.L.attn.hook_z`, as `run_with_hooks` would), the full
              logits, and the mean next-token loss on the repeated half (targets |R|+1..=2|R|).
All of it under torch.inference_mode(), timed once (one pass; the whole job is many forwards).

Prints one JSON line on stdout: versions, threads, shapes, {"detectors_s", "ablations_s"}, and the
results (per head, `layer * n_heads + head`: the six scores, the zero-ablation deltas, the clean loss)
so the caller can check both sides agree. Progress goes to stderr.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    if not path.exists():
        sys.exit(f"error: model not found: {path}")
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    return model.eval()


def z_module(model, layer):
    """The module whose input is `blocks.{layer}.attn.hook_z`."""
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h[layer].attn.c_proj
    return model.model.layers[layer].self_attn.o_proj


def dims(model):
    c = model.config
    if hasattr(model, "transformer"):
        return c.n_layer, c.n_head, c.n_embd // c.n_head
    return c.num_hidden_layers, c.num_attention_heads, c.head_dim


# TransformerLens' detection patterns (see tests/fixtures/heads_ref.py for the source followed).
def previous_token_pattern(ids):
    import torch

    return torch.diag(torch.ones(ids.shape[-1] - 1), diagonal=-1)


def duplicate_token_pattern(ids):
    import torch

    eq = (ids.reshape(-1, 1) == ids.reshape(1, -1)).float()
    eq.fill_diagonal_(0)
    return torch.tril(eq)


def induction_pattern(ids):
    import torch

    shifted = torch.roll(duplicate_token_pattern(ids), shifts=1, dims=1)
    shifted[:, 0] = 0
    return torch.tril(shifted)


def mul(pats, detection):
    """pats [layers, heads, S, S] -> [layers, heads]: sum(A * P) / sum(A)."""
    return (pats * detection).sum(dim=(-2, -1)) / pats.sum(dim=(-2, -1))


def detectors(model, repeated, repeat_len, text):
    import torch

    out = model(input_ids=repeated, output_attentions=True, use_cache=False)
    pats = torch.stack(out.attentions, dim=1)  # [batch, layers, heads, S, S]
    sums = {k: 0 for k in ("induction", "induction_mul", "previous_token", "duplicate_token")}
    for b, ids in enumerate(repeated):
        p = pats[b]
        sums["induction"] = sums["induction"] + p.diagonal(offset=1 - repeat_len, dim1=-2, dim2=-1).mean(-1)
        sums["induction_mul"] = sums["induction_mul"] + mul(p, induction_pattern(ids))
        sums["previous_token"] = sums["previous_token"] + mul(p, previous_token_pattern(ids))
        sums["duplicate_token"] = sums["duplicate_token"] + mul(p, duplicate_token_pattern(ids))
    scores = {k: v / len(repeated) for k, v in sums.items()}
    prev, dup = 0, 0
    for ids in text:
        p = torch.stack(model(input_ids=ids.unsqueeze(0), output_attentions=True, use_cache=False).attentions)[:, 0]
        prev = prev + mul(p, previous_token_pattern(ids))
        dup = dup + mul(p, duplicate_token_pattern(ids))
    scores["previous_token_text"] = prev / max(len(text), 1)
    scores["duplicate_token_text"] = dup / max(len(text), 1)
    return scores


def repeated_half_loss(logits, ids, repeat_len):
    import torch.nn.functional as F

    r = repeat_len
    pred = logits[:, r : 2 * r]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, r + 1 : 2 * r + 1].reshape(-1)).item()


def ablations(model, repeated, repeat_len):
    n_layers, n_heads, d_head = dims(model)
    clean = repeated_half_loss(model(input_ids=repeated, use_cache=False).logits, repeated, repeat_len)
    zero = []
    for layer in range(n_layers):
        for head in range(n_heads):
            lo, hi = head * d_head, (head + 1) * d_head

            def ablate(module, args):
                z = args[0].clone()
                z[..., lo:hi] = 0.0
                return (z,) + tuple(args[1:])

            handle = z_module(model, layer).register_forward_pre_hook(ablate)
            try:
                logits = model(input_ids=repeated, use_cache=False).logits
            finally:
                handle.remove()
            zero.append(repeated_half_loss(logits, repeated, repeat_len) - clean)
        print(f"  ablated layer {layer} ({(layer + 1) * n_heads} heads)", file=sys.stderr)
    return clean, zero


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file or HF directory")
    parser.add_argument("--tokens", required=True, help="JSON file {repeat_len, repeated, text}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.tokens).read_text())
    repeat_len = int(data["repeat_len"])
    repeated = torch.tensor(data["repeated"], dtype=torch.int64)
    text = [torch.tensor(t, dtype=torch.int64) for t in data["text"]]
    start = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded the model in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    with torch.inference_mode():
        print("PyTorch: detector scores", file=sys.stderr)
        start = time.perf_counter()
        scores = detectors(model, repeated, repeat_len, text)
        detectors_s = time.perf_counter() - start
        print(f"PyTorch: single-head zero ablations ({detectors_s:.1f} s for the detectors)", file=sys.stderr)
        start = time.perf_counter()
        clean, zero = ablations(model, repeated, repeat_len)
        ablations_s = time.perf_counter() - start

    n_layers, n_heads, _ = dims(model)
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "repeated": list(repeated.shape),
        "text": len(text),
        "detectors_s": detectors_s,
        "ablations_s": ablations_s,
        "scores": {k: v.flatten().tolist() for k, v in scores.items()},
        "clean_loss": clean,
        "zero": zero,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
