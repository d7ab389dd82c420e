#!/usr/bin/env python3
"""PyTorch reference for `loupe bench circuit`: activation patching of every head and every MLP of a
model on a task's pairs, done the way a TransformerLens user does it, on the same tokens as Loupe.

    ~/.cache/loupe/pyenv/bin/python benches/reference/circuit.py \
        --model ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf --tokens tokens.json --threads 2

`loupe bench circuit` runs this script itself (the venv comes from benches/reference/setup-env.sh)
and writes the token file: {"pairs": [{"clean": [id, ...], "corrupt": [id, ...], "answer": id,
"wrong": id}, ...]} (BOS first; a pair's clean and corrupt sequences have the same length). The
model is loaded as tests/fixtures/regen.py loads it (AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32), transformers' default attention), with
torch.set_num_threads(--threads).

The work, with the definitions of tests/fixtures/circuits_ref.py (TransformerLens' patching.py
`get_act_patch_attn_head_out_all_pos` and `get_act_patch_mlp_out`):
  runs      all pairs as one batch, right-padded to the longest with each row's last token (the
            model is causal, so padding after a row's last token changes nothing before it): the
            corrupt forward caching every layer's hook_z (the input of the attention output
            projection, by a forward pre-hook) and MLP output (a forward hook), as `run_with_cache`
            does, and the clean forward; the metric logit(answer) - logit(wrong) at each row's
            last position.
  patching  one forward of the clean batch per node (72 heads and 18 MLPs for Gemma 3 270M), with a
            hook that replaces the node's output by the corrupt run's at every position (a head's
            slice of hook_z, or the MLP's output), as `run_with_hooks` would, the full logits, and
            the metric; effect = (mean m_patched - mean m_clean) / (mean m_corrupt - mean m_clean).
All of it under torch.inference_mode(), timed once (the job is itself 90+ forwards).

Prints one JSON line on stdout: versions, threads, shapes, "runs_s", "patching_s", the per-pair clean
and corrupt metrics and the per-node effects (Loupe's order: per layer its heads, then its MLP) so
the caller can check both sides agree. Progress goes to stderr.
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
    kwargs = {"dtype": torch.float32}
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    return model.eval()


def layer_of(model, L):
    return model.transformer.h[L] if hasattr(model, "transformer") else model.model.layers[L]


def z_module(model, L):
    """The module whose input is `blocks.L.attn.hook_z`."""
    layer = layer_of(model, L)
    return layer.attn.c_proj if hasattr(model, "transformer") else layer.self_attn.o_proj


def dims(model):
    c = model.config
    if hasattr(model, "transformer"):
        return c.n_layer, c.n_head, c.n_embd // c.n_head
    return c.num_hidden_layers, c.num_attention_heads, c.head_dim


def batch(pairs, key):
    import torch

    n = max(len(p[key]) for p in pairs)
    return torch.tensor([p[key] + [p[key][-1]] * (n - len(p[key])) for p in pairs], dtype=torch.int64)


def metrics(logits, last, answers, wrongs):
    import torch

    rows = torch.arange(logits.shape[0])
    at = logits[rows, last]
    return at[rows, answers] - at[rows, wrongs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file or HF directory")
    parser.add_argument("--tokens", required=True, help="JSON file {pairs: [{clean, corrupt, answer, wrong}]}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    pairs = json.loads(Path(args.tokens).read_text())["pairs"]
    clean, corrupt = batch(pairs, "clean"), batch(pairs, "corrupt")
    last = torch.tensor([len(p["clean"]) - 1 for p in pairs])
    answers = torch.tensor([p["answer"] for p in pairs])
    wrongs = torch.tensor([p["wrong"] for p in pairs])
    start = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded the model in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    n_layers, n_heads, d_head = dims(model)

    with torch.inference_mode():
        print("PyTorch: clean and corrupt runs", file=sys.stderr)
        start = time.perf_counter()
        z, mlp, handles = {}, {}, []
        for L in range(n_layers):

            def grab_z(mod, a, L=L):
                z[L] = a[0].clone()

            def grab_mlp(mod, a, out, L=L):
                mlp[L] = out.clone()

            handles.append(z_module(model, L).register_forward_pre_hook(grab_z))
            handles.append(layer_of(model, L).mlp.register_forward_hook(grab_mlp))
        try:
            m_corrupt = metrics(model(input_ids=corrupt, use_cache=False).logits, last, answers, wrongs)
        finally:
            for h in handles:
                h.remove()
        m_clean = metrics(model(input_ids=clean, use_cache=False).logits, last, answers, wrongs)
        runs_s = time.perf_counter() - start

        print(f"PyTorch: patching {n_layers * (n_heads + 1)} nodes ({runs_s:.1f} s for the runs)", file=sys.stderr)
        start = time.perf_counter()
        mc, mk = m_clean.double().mean().item(), m_corrupt.double().mean().item()
        effects = []
        for L in range(n_layers):
            for h in list(range(n_heads)) + [None]:
                if h is None:

                    def patch_mlp(mod, a, out, L=L):
                        return mlp[L]

                    handle = layer_of(model, L).mlp.register_forward_hook(patch_mlp)
                else:
                    lo, hi = h * d_head, (h + 1) * d_head

                    def patch_z(mod, a, L=L, lo=lo, hi=hi):
                        x = a[0].clone()
                        x[..., lo:hi] = z[L][..., lo:hi]
                        return (x,) + tuple(a[1:])

                    handle = z_module(model, L).register_forward_pre_hook(patch_z)
                try:
                    logits = model(input_ids=clean, use_cache=False).logits
                finally:
                    handle.remove()
                m = metrics(logits, last, answers, wrongs).double().mean().item()
                effects.append((m - mc) / (mk - mc))
            print(f"  patched layer {L}", file=sys.stderr)
        patching_s = time.perf_counter() - start

    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "batch": list(clean.shape),
        "runs_s": runs_s,
        "patching_s": patching_s,
        "metric_clean": m_clean.tolist(),
        "metric_corrupt": m_corrupt.tolist(),
        "effects": effects,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
