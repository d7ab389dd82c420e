#!/usr/bin/env python3
"""PyTorch reference for `loupe bench capture [--with-grads]`: times transformers on the same tokens.

    ~/.cache/loupe/pyenv/bin/python benches/reference/capture_reference.py \
        --model ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf --tokens ids.json --mode capture --repeats 3

`loupe bench capture` runs this script itself (the venv comes from benches/reference/setup-env.sh) and
writes the token file: a JSON object {"tokens": [[id, ...], ...]}, equal-length contexts with BOS first.
The model is loaded as tests/fixtures/regen.py loads it: AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32) (a GGUF is dequantized to f32; an HF directory is loaded as is),
with transformers' default attention implementation and torch.set_num_threads(--threads).

Modes (each timed as one warm-up, then --repeats passes over the whole batch at once):
  capture  `first7`: the embedding and decoder layers 0..6 under torch.inference_mode(), returning
           layer 6's output (`blocks.6.hook_resid_post`, before any norm): a forward hook on layer 6
           raises to stop the pass there, so neither the later layers, the final norm nor the
           unembedding run. Checked once against the same hook in a full forward pass (equal).
           `full` (for information): the whole model, all 18 layers and the logits.
  grads    a naive training-style step: model(ids).logits, the mean next-token cross-entropy,
           loss.backward() (weight gradients included, as a user who never turns them off gets),
           with layer 6's output kept by a forward hook and its gradient by retain_grad().

Prints one JSON line on stdout: mode, versions, threads, shape, per timing {best_s, mean_s,
tokens_per_s (from best_s)}, and a `check` object (mean |x| of layer 6's output over positions 1..,
and for grads mean |dL/dx| for the mean loss) so the caller can see both sides computed the same.
Progress goes to stderr.
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
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loading bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

LAYER = 6


class Stop(Exception):
    """Raised by the layer-6 hook to end a forward pass early, carrying the layer's output."""

    def __init__(self, out):
        super().__init__("stop after layer 6")
        self.out = out


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    if not path.exists():
        sys.exit(f"error: model not found: {path}")
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def timed(fn, repeats):
    """One warm-up call, then `repeats` timed calls; returns (best, mean) seconds and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), sum(times) / len(times), result


def summary(best, mean, tokens):
    return {"best_s": best, "mean_s": mean, "tokens_per_s": tokens / best}


def bench_capture(model, ids, repeats):
    import torch

    layer = model.model.layers[LAYER]

    def stop_hook(module, inputs, out):
        raise Stop(layer_output(out))

    def first7():
        handle = layer.register_forward_hook(stop_hook)
        try:
            with torch.inference_mode():
                model.model(input_ids=ids, use_cache=False)
        except Stop as stop:
            return stop.out
        finally:
            handle.remove()
        raise RuntimeError("the forward pass did not reach layer 6")

    def full():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    # The early stop must give exactly what layer 6 outputs inside a full forward pass.
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, out: seen.setdefault("x", layer_output(out).clone()))
    try:
        full()
    finally:
        handle.remove()
    x = first7()
    if not torch.equal(x, seen["x"]):
        diff = (x - seen["x"]).abs().max().item()
        sys.exit(f"error: layer 6 output of the truncated pass differs from the full pass (max {diff})")

    tokens = ids.numel()
    print(f"timing PyTorch first 7 blocks ({repeats} passes after a warm-up)", file=sys.stderr)
    best, mean, x = timed(first7, repeats)
    first = summary(best, mean, tokens)
    print(f"timing PyTorch full model ({repeats} passes after a warm-up)", file=sys.stderr)
    best, mean, _ = timed(full, repeats)
    return {
        "first7": first,
        "full": summary(best, mean, tokens),
        "check": {"resid_abs_mean": x[:, 1:].abs().mean().item()},
    }


def bench_grads(model, ids, repeats):
    import torch
    import torch.nn.functional as F

    layer = model.model.layers[LAYER]
    kept = {}

    def keep_hook(module, inputs, out):
        x = layer_output(out)
        x.retain_grad()
        kept["x"] = x

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        x = kept.pop("x")
        return x.detach(), x.grad

    handle = layer.register_forward_hook(keep_hook)
    try:
        print(f"timing PyTorch forward+backward ({repeats} passes after a warm-up)", file=sys.stderr)
        best, mean, (x, grad) = timed(step, repeats)
    finally:
        handle.remove()
    return {
        "grads": summary(best, mean, ids.numel()),
        "check": {
            "resid_abs_mean": x[:, 1:].abs().mean().item(),
            "grad_abs_mean": grad[:, 1:].abs().mean().item(),
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file or HF directory")
    parser.add_argument("--tokens", required=True, help='JSON file {"tokens": [[id, ...], ...]}')
    parser.add_argument("--mode", choices=["capture", "grads"], required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    rows = json.loads(Path(args.tokens).read_text())["tokens"]
    ids = torch.tensor(rows, dtype=torch.int64)
    start = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded the model in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.mode == "capture":
        result = bench_capture(model, ids, args.repeats)
    else:
        result = bench_grads(model, ids, args.repeats)
    head = {
        "mode": args.mode,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "batch": ids.shape[0],
        "seq": ids.shape[1],
        "repeats": args.repeats,
    }
    print(json.dumps({**head, **result}))


if __name__ == "__main__":
    main()
