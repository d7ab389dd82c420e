"""circuit-tracer reads Loupe's cross-layer transcoder files and computes what Loupe computes.

Usage: python scripts/clt_circuit_tracer_check.py tests/fixtures/clt-circuit-tracer
(with circuit-tracer 0.5.0 installed: ~/.cache/loupe/ctenv/bin/python).

The folder holds a CLT written by Loupe (`W_enc_{i}` / `W_dec_{i}` safetensors, cfg.json) and
expected.json: per layer the inputs x, Loupe's pre-activations, its TopK activations and its
reconstruction of every layer's MLP output. circuit-tracer has no TopK, so the check is
- its pre-activations (`encode_layer(..., apply_activation_function=False)`) equal Loupe's;
- its decoder (`decode`, every layer's output from every earlier layer's features) applied to
  Loupe's TopK activations equals Loupe's outputs;
- its JumpReLU (`threshold_{i}` from the files) keeps exactly the pre-activations above the
  threshold.
"""

import json
import sys

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt


def main(folder: str) -> None:
    expected = json.load(open(f"{folder}/expected.json"))
    clt = load_clt(folder, lazy_decoder=False, lazy_encoder=False, device=torch.device("cpu"), dtype=torch.float32)
    n_layers = len(expected["x"])
    assert clt.n_layers == n_layers, (clt.n_layers, n_layers)
    x = torch.tensor(expected["x"])  # [layers, tokens, d]
    worst = 0.0
    for layer in range(n_layers):
        pre = clt.encode_layer(x[layer], layer, apply_activation_function=False)
        want = torch.tensor(expected["pre"][layer])
        worst = max(worst, (pre - want).abs().max().item())
        jump = clt.apply_activation_function(layer, pre.clone())
        threshold = clt.activation_function.threshold[layer]
        assert torch.equal(jump != 0, pre > threshold), f"layer {layer}: JumpReLU mask"
    assert worst < 1e-4, f"pre-activations differ by {worst}"
    acts = torch.tensor(expected["acts"])  # [layers, tokens, n]
    out = clt.decode(acts)  # [layers, tokens, d]
    want = torch.tensor(expected["out"])
    diff = (out - want).abs().max().item()
    assert diff < 1e-4, f"reconstructions differ by {diff}"
    print(f"circuit-tracer matches Loupe: {n_layers} layers, pre-activations within {worst:.2e}, outputs within {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
