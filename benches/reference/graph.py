#!/usr/bin/env python3
"""circuit-tracer reference for `loupe bench graph`: the attribution graph of one prompt on Gemma 3
270M (CPU, f32) through per-layer transcoders, with circuit-tracer 0.5.0 itself.

    PY=$(benches/reference/setup-ct-env.sh | tail -1)
    $PY benches/reference/graph.py --model ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf \
        --transcoders DIR --tokens tokens.json --batch 32 --max-feature-nodes 1024 --threads 2

`loupe bench graph` runs this script itself (one process per prompt, so that a prompt that runs out
of memory under the bench's address-space cap takes only itself down) and writes its inputs:
  tokens.json   {"tokens": [id, ...]} (BOS first; circuit-tracer keeps a leading special token)
  DIR           the transcoders exported from the Loupe store in circuit-tracer's
                `SingleLayerTranscoder` layout, `layer_{L}.safetensors` (W_enc [n, d], W_dec [n, d],
                b_enc [n], b_dec [d], optional W_skip [d, d] applied as x @ W_skipᵀ, optional
                threshold [n] for JumpReLU) and `transcoders.json` {"layers": [{"file",
                "activation": "topk" | "jumprelu" | "relu", "k"}]}.

The model: transformers 4.57.3 loads the GGUF (AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32, attn_implementation="eager") and its tokenizer), as the other
references load it; circuit-tracer's nnsight backend (the one it has for Gemma 3) wraps that loaded
model the way `NNSightReplacementModel.from_config` wraps a model it builds itself (the nnsight
`LanguageModel` constructor on the HF model, then `_configure_replacement_model(transcoders)`),
because circuit-tracer's own loaders take a hub name, not a GGUF file. The transcoders read
`mlp.hook_in` (the pre-feedforward norm's output: Loupe's `blocks.L.ln2.hook_normalized`) and write
`hook_mlp_out` (the post-feedforward norm's output). TopK: circuit-tracer's `TopK` module keeps the
k largest pre-activations even when negative; Loupe keeps only the positive ones among them, so the
activation here is TopK followed by ReLU (the same features as Loupe's).

The work, timed: `circuit_tracer.attribute(tokens, model, max_n_logits, desired_logit_prob,
batch_size, max_feature_nodes)` (the unpruned graph), then `prune_graph(graph, node_threshold,
edge_threshold)` and `compute_graph_scores` (what `loupe graph` also does before writing).
Prints one JSON line on stdout: versions, threads, load_s, attribute_s, prune_s, the active
features, the feature nodes, the logits (ids, probabilities), the nodes and edges kept, and the
replacement and completeness scores. Progress goes to stderr.
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


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_model(path, cache=None):
    """The model and tokenizer; a GGUF is dequantized once into `cache` (an HF folder) when given,
    and later runs load that folder (transformers dequantizes Q4_K slowly)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.exists():
        sys.exit(f"error: model not found: {path}")
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
    if cache and (Path(cache) / "config.json").exists():
        path = Path(cache)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if model.config.architectures is None:  # a GGUF's config names none; circuit-tracer needs it
            model.config.architectures = [type(model).__name__]
        if cache:
            model.save_pretrained(cache)
            tokenizer.save_pretrained(cache)
    return model.eval(), tokenizer


class TopKRelu:
    """circuit-tracer's TopK, then ReLU: the k largest pre-activations that are positive."""

    def __init__(self, k):
        from circuit_tracer.transcoder.activation_functions import TopK

        self.topk = TopK(k)

    def __call__(self, x):
        return self.topk(x).relu()


def load_transcoders(folder):
    import torch
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = json.loads((folder / "transcoders.json").read_text())
    layers = {}
    for layer, entry in enumerate(spec["layers"]):
        t = load_file(str(folder / entry["file"]))
        n, d = t["W_enc"].shape
        if entry["activation"] == "topk":
            act = TopKRelu(int(entry["k"]))
        elif entry["activation"] == "jumprelu":
            act = JumpReLU(t["threshold"], bandwidth=0.1)
        elif entry["activation"] == "relu":
            act = torch.nn.ReLU()
        else:
            sys.exit(f"error: unknown activation {entry['activation']!r} in {folder / 'transcoders.json'}")
        tc = SingleLayerTranscoder(
            d, n, act, layer, skip_connection="W_skip" in t, device=torch.device("cpu"), dtype=torch.float32
        )
        with torch.no_grad():
            for name in ["W_enc", "W_dec", "b_enc", "b_dec"] + (["W_skip"] if "W_skip" in t else []):
                getattr(tc, name).copy_(t[name])
        layers[layer] = tc
    return TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")


def replacement_model(hf_model, tokenizer, transcoders):
    from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel

    # As NNSightReplacementModel.from_config does with the model it builds.
    model = NNSightReplacementModel(hf_model, tokenizer=tokenizer, dispatch=True)
    model._hf_config = hf_model.config
    model._configure_replacement_model(transcoders)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file or HF directory")
    parser.add_argument("--transcoders", required=True, help="folder with transcoders.json and layer_L.safetensors")
    parser.add_argument("--tokens", required=True, help='JSON file {"tokens": [id, ...]}')
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--max-logits", type=int, default=10)
    parser.add_argument("--logit-probability", type=float, default=0.95)
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.98)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-cache", help="HF folder to keep the dequantized GGUF in between runs")
    parser.add_argument("--prepare", action="store_true", help="only fill --model-cache, then exit")
    args = parser.parse_args()

    import importlib.metadata as md

    import torch
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    torch.set_num_threads(args.threads)
    if args.prepare:
        load_model(args.model, args.model_cache)
        print(json.dumps({"prepared": args.model_cache}))
        return
    tokens = torch.tensor(json.loads(Path(args.tokens).read_text())["tokens"], dtype=torch.int64)

    start = time.time()
    hf_model, tokenizer = load_model(args.model, args.model_cache)
    model = replacement_model(hf_model, tokenizer, load_transcoders(args.transcoders))
    load_s = time.time() - start
    log(f"circuit-tracer: model and transcoders loaded in {load_s:.1f} s; attributing {len(tokens)} tokens")

    start = time.time()
    graph = attribute(
        tokens,
        model,
        max_n_logits=args.max_logits,
        desired_logit_prob=args.logit_probability,
        batch_size=args.batch,
        max_feature_nodes=args.max_feature_nodes,
    )
    attribute_s = time.time() - start
    if not torch.equal(graph.input_tokens.cpu(), tokens):
        sys.exit("error: circuit-tracer changed the prompt's tokens")
    log(f"circuit-tracer: attribution {attribute_s:.1f} s; pruning")

    start = time.time()
    pruned = prune_graph(graph, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    replacement, completeness = compute_graph_scores(graph)
    prune_s = time.time() - start

    report = {
        "circuit_tracer": md.version("circuit-tracer"),
        "torch": torch.__version__,
        "transformers": md.version("transformers"),
        "nnsight": md.version("nnsight"),
        "threads": torch.get_num_threads(),
        "tokens": len(tokens),
        "load_s": load_s,
        "attribute_s": attribute_s,
        "prune_s": prune_s,
        "active_features": int(graph.active_features.shape[0]),
        "feature_nodes": int(graph.selected_features.shape[0]),
        "logit_tokens": [int(t.vocab_idx) for t in graph.logit_targets],
        "logit_probabilities": [float(p) for p in graph.logit_probabilities],
        "nodes_kept": int(pruned.node_mask.sum()),
        "edges_kept": int(pruned.edge_mask.sum()),
        "replacement_score_unpruned": float(replacement),
        "completeness_score_unpruned": float(completeness),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
