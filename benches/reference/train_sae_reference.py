#!/usr/bin/env python3
"""PyTorch reference for `loupe bench train-sae`: trains a TopK SAE on stored activations, two ways.

    ~/.cache/loupe/pyenv/bin/python benches/reference/train_sae_reference.py --data acts.f32 \
        --d 640 --n 16384 --k 32 --batch 4096 --train-rows R --eval-rows E --lr 2e-4 \
        --threads 2 --seed 0 --impl dense,sparse [--warmup-steps 2]
    ~/.cache/loupe/pyenv/bin/python benches/reference/train_sae_reference.py --self-check

--data is raw little-endian f32, row-major [rows, d]. The first --train-rows rows are the training
tokens, used in order without shuffling (steps = train_rows // batch, any remainder unused); the
last --eval-rows rows of the file are held out for evaluation.

Model (both impls, same math): z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)), keeping the k largest
ReLU'd pre-activations per token (torch.topk, sorted=False), x_hat = sum_i z_i W_dec[i] + b_dec.
W_enc, W_dec are [n, d] (row i = feature i), b_enc [n], b_dec [d], all f32.
Init, deterministic from --seed (torch.Generator): W_dec rows ~ N(0, I) scaled to unit norm;
W_enc = copy of W_dec; b_enc = 0; b_dec = geometric median of the first training batch by
Weiszfeld's iteration in float64: start at the mean y, then y <- sum_j w_j x_j / sum_j w_j with
w_j = 1 / max(|x_j - y|, 1e-12), at most 100 iterations, stopping after the first step whose
length |y_new - y| is < 1e-6 |y_new|.
Loss per step = FVU = sum |x - x_hat|^2 / sum |x - mean_batch(x)|^2; no auxiliary losses.
Adam(lr, betas (0.9, 0.999), eps 1e-8), no weight decay, constant lr. Before each optimizer step
the component of each W_dec row's gradient along the (unit) row is removed; after it the rows are
renormalised to unit norm.

Impls (the same init for both):
  dense   SAELens-like: dense pre-activations, torch.topk, the kept values scattered into a dense
          [B, n] z, x_hat = z @ W_dec + b_dec, plain autograd (dense backward GEMMs).
  sparse  sparsify-like: custom autograd Functions. The encoder returns (values, indices) [B, k] and
          its backward touches only the selected rows (index_add_ into W_enc / b_enc, an
          embedding_bag of W_enc rows for the input gradient); the decoder is an embedding_bag
          whose backward gathers the selected W_dec rows and index_add_s into them.
--self-check compares the two impls' loss and gradients in float64 at small sizes (exit 1 if any
gradient differs by more than 1e-8 relative to its largest entry).

Timed: the first --warmup-steps steps are trained but untimed; one time.perf_counter() span covers
all the remaining steps, each being: data slice -> tensor, forward, loss, backward, decoder-gradient
projection, optimizer step, renormalisation (plus a loss.item() for progress). tokens_per_s =
timed_steps * batch / seconds. After training, the held-out rows are encoded in batches of --batch
(no grad): eval_fvu = sum |x - x_hat|^2 / sum |x - mean_eval(x)|^2 over the whole eval set,
eval_l0 = mean number of nonzero z per token, dead_fraction = fraction of features never nonzero
on it. first/final_train_fvu are the FVUs of the first and last training batches (before their
updates). Prints one JSON line on stdout; progress goes to stderr. Errors exit 2.
"""

import argparse
import json
import os
import sys
import time

IMPLS = ("dense", "sparse")


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def pre_acts(xc, W_enc, b_enc):
    """ReLU(xc @ W_enc^T + b_enc), [B, n]: the one dense GEMM both impls share."""
    import torch

    return torch.relu(torch.addmm(b_enc, xc, W_enc.T))


def make_functions():
    import torch
    import torch.nn.functional as F

    class SparseEncode(torch.autograd.Function):
        """(xc, W_enc, b_enc) -> top-k (values, indices) of ReLU(xc W_enc^T + b_enc); sparse backward."""

        @staticmethod
        def forward(ctx, xc, W_enc, b_enc, k):
            values, indices = pre_acts(xc, W_enc, b_enc).topk(k, dim=1, sorted=False)
            ctx.save_for_backward(xc, W_enc, values, indices)
            ctx.mark_non_differentiable(indices)
            return values, indices

        @staticmethod
        def backward(ctx, grad_values, _grad_indices):
            xc, W_enc, values, indices = ctx.saved_tensors
            g = grad_values * (values > 0)  # ReLU's gradient: zero where the kept value is 0
            flat = indices.flatten()
            grad_xc = grad_W = grad_b = None
            if ctx.needs_input_grad[0]:  # sum_j g[b, j] W_enc[idx[b, j]]
                grad_xc = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")
            if ctx.needs_input_grad[1]:  # row idx[b, j] += g[b, j] * xc[b]
                rows = (g.unsqueeze(2) * xc.unsqueeze(1)).reshape(-1, xc.shape[1])
                grad_W = torch.zeros_like(W_enc).index_add_(0, flat, rows)
            if ctx.needs_input_grad[2]:
                grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype).index_add_(0, flat, g.flatten())
            return grad_xc, grad_W, grad_b, None

    class SparseDecode(torch.autograd.Function):
        """(values, indices, W_dec) -> sum_j values[b, j] W_dec[idx[b, j]] (no bias); sparse backward."""

        @staticmethod
        def forward(ctx, values, indices, W_dec):
            ctx.save_for_backward(values, indices, W_dec)
            return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

        @staticmethod
        def backward(ctx, grad_out):
            values, indices, W_dec = ctx.saved_tensors
            grad_values = grad_W = None
            if ctx.needs_input_grad[0]:  # <grad_out[b], W_dec[idx[b, j]]>
                grad_values = (grad_out.unsqueeze(1) * W_dec[indices]).sum(-1)
            if ctx.needs_input_grad[2]:  # row idx[b, j] += values[b, j] * grad_out[b]
                rows = (values.unsqueeze(2) * grad_out.unsqueeze(1)).reshape(-1, grad_out.shape[1])
                grad_W = torch.zeros_like(W_dec).index_add_(0, indices.flatten(), rows)
            return grad_values, None, grad_W

    return SparseEncode, SparseDecode


def forward(impl, params, x, k, fns):
    """Returns (x_hat, values, indices) of the SAE on x [B, d]; values/indices are the top-k codes."""
    import torch

    W_enc, b_enc, W_dec, b_dec = params
    xc = x - b_dec
    if impl == "dense":
        values, indices = pre_acts(xc, W_enc, b_enc).topk(k, dim=1, sorted=False)
        z = torch.zeros(x.shape[0], W_enc.shape[0], dtype=x.dtype).scatter(1, indices, values)
        return z @ W_dec + b_dec, values, indices
    encode, decode = fns
    values, indices = encode.apply(xc, W_enc, b_enc, k)
    return decode.apply(values, indices, W_dec) + b_dec, values, indices


def fvu(x, x_hat):
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def geometric_median(x, iters=100, tol=1e-6):
    """Weiszfeld's iteration in float64 from the mean (see the module docstring); returns (y, iterations)."""
    x = x.double()
    y = x.mean(0)
    for it in range(1, iters + 1):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        step = (y_new - y).norm().item()
        y = y_new
        if step < tol * y.norm().item():
            break
    return y, it


def init_params(d, n, seed, first_batch, dtype, init_decoder=None):
    import numpy as np
    import torch

    if init_decoder is not None:
        # The caller's decoder (e.g. Loupe's own init), so both sides start from the same weights.
        W_dec = torch.from_numpy(np.fromfile(init_decoder, dtype="<f4").reshape(n, d).astype(np.float64))
    else:
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(n, d, generator=gen, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_dec, iters = geometric_median(first_batch)
    log(f"b_dec: geometric median of the first batch after {iters} Weiszfeld iterations")
    W_dec = W_dec.to(dtype)
    return [W_dec.clone(), torch.zeros(n, dtype=dtype), W_dec, b_dec.to(dtype)]


def project_decoder_grad(W_dec):
    """Removes from each W_dec row's gradient its component along the (unit-norm) row."""
    g = W_dec.grad
    g -= (g * W_dec).sum(1, keepdim=True) * W_dec


def train(impl, init, data, args, fns):
    """Trains one impl from a copy of `init`; returns its result dict."""
    import numpy as np
    import torch

    params = [p.clone().requires_grad_(True) for p in init]
    W_dec = params[2]
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = args.train_rows // args.batch
    losses = []
    start = None
    for step in range(steps):
        if step == args.warmup_steps:
            start = time.perf_counter()
        x = torch.from_numpy(np.array(data[step * args.batch:(step + 1) * args.batch]))
        x_hat, _, _ = forward(impl, params, x, args.k, fns)
        loss = fvu(x, x_hat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            project_decoder_grad(W_dec)
            opt.step()
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == steps - 1:
            log(f"{impl}: step {step + 1}/{steps} train FVU {losses[-1]:.5f}")
    seconds = time.perf_counter() - start
    timed = steps - args.warmup_steps
    log(f"{impl}: {timed} timed steps in {seconds:.2f} s ({timed * args.batch / seconds:.0f} tokens/s)")
    return {"tokens_per_s": timed * args.batch / seconds, "seconds": seconds,
            **evaluate(impl, params, data, args, fns),
            "first_train_fvu": losses[0], "final_train_fvu": losses[-1]}


def evaluate(impl, params, data, args, fns):
    """FVU, mean L0 and dead fraction over the last --eval-rows rows of the data, in float64 sums."""
    import numpy as np
    import torch

    rows = data.shape[0]
    lo = rows - args.eval_rows
    spans = [(s, min(s + args.batch, rows)) for s in range(lo, rows, args.batch)]
    mean = sum(np.asarray(data[a:b], dtype=np.float64).sum(0) for a, b in spans) / args.eval_rows
    mean = torch.from_numpy(mean)
    err = var = 0.0
    nonzero = 0
    fired = torch.zeros(args.n, dtype=torch.bool)
    with torch.no_grad():
        for a, b in spans:
            x = torch.from_numpy(np.array(data[a:b]))
            x_hat, values, indices = forward(impl, params, x, args.k, fns)
            err += (x - x_hat).double().pow(2).sum().item()
            var += (x.double() - mean).pow(2).sum().item()
            live = values > 0
            nonzero += live.sum().item()
            fired[indices[live]] = True
    result = {"eval_fvu": err / var, "eval_l0": nonzero / args.eval_rows,
              "dead_fraction": 1.0 - fired.sum().item() / args.n}
    log(f"{impl}: eval FVU {result['eval_fvu']:.5f}, L0 {result['eval_l0']:.2f}, "
        f"dead {result['dead_fraction']:.4f}")
    return result


def self_check(fns):
    """float64, small sizes: the sparse impl's loss and gradients must equal dense autograd's."""
    import torch

    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    # The second case has a very negative b_enc so that fewer than k pre-activations are positive
    # and top-k keeps zeros (whose ReLU gradient must be zero).
    for b, d, n, k, shift in [(64, 16, 96, 6, 0.0), (48, 12, 64, 8, -2.5)]:
        x = torch.randn(b, d, generator=gen, dtype=torch.float64)
        W_dec = torch.randn(n, d, generator=gen, dtype=torch.float64)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        b_enc = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64) + shift
        b_dec = 0.2 * torch.randn(d, generator=gen, dtype=torch.float64)
        grads, losses = {}, {}
        for impl in IMPLS:
            params = [p.clone().requires_grad_(True) for p in (W_enc, b_enc, W_dec, b_dec)]
            x_hat, values, _ = forward(impl, params, x, k, fns)
            loss = fvu(x, x_hat)
            loss.backward()
            grads[impl], losses[impl] = [p.grad for p in params], loss.item()
        zeros = (values == 0).sum().item()
        log(f"self-check B={b} d={d} n={n} k={k} ({zeros} kept zeros): loss dense {losses['dense']:.12f} "
            f"sparse {losses['sparse']:.12f}")
        worst = max(worst, abs(losses["dense"] - losses["sparse"]) / abs(losses["dense"]))
        for name, gd, gs in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads["dense"], grads["sparse"]):
            diff = (gd - gs).abs().max().item()
            rel = diff / gd.abs().max().item()
            worst = max(worst, rel)
            log(f"  grad {name}: max abs diff {diff:.3e} (relative {rel:.3e})")
    ok = worst <= 1e-8
    log(f"self-check {'passed' if ok else 'FAILED'}: worst relative difference {worst:.3e}")
    sys.exit(0 if ok else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="raw little-endian f32 file, row-major [rows, d]")
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--train-rows", type=int)
    parser.add_argument("--eval-rows", type=int)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", default="dense,sparse", help="comma list of: dense, sparse")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    parser.add_argument("--init-decoder", help="raw f32 [n, d] file: the initial W_dec (default: seeded Gaussian)")
    parser.add_argument("--self-check", action="store_true", help="check sparse vs dense gradients, exit")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    fns = make_functions()
    if args.self_check:
        self_check(fns)

    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    if not impls or any(i not in IMPLS for i in impls):
        die(f"--impl must be a comma list of {', '.join(IMPLS)}, got {args.impl!r}")
    if args.data is None or args.train_rows is None or args.eval_rows is None:
        die("--data, --train-rows and --eval-rows are required (or use --self-check)")
    if min(args.d, args.n, args.k, args.batch, args.eval_rows, args.log_every) < 1 or args.k > args.n:
        die("--d, --n, --k, --batch, --eval-rows, --log-every must be >= 1 and --k <= --n")
    if args.warmup_steps < 0:
        die("--warmup-steps must be >= 0")
    if not os.path.isfile(args.data):
        die(f"data file not found: {args.data}")
    size = os.path.getsize(args.data)
    if size == 0 or size % (4 * args.d):
        die(f"{args.data}: size {size} bytes is not a nonzero multiple of d*4 = {4 * args.d}")
    rows = size // (4 * args.d)
    steps = args.train_rows // args.batch
    if steps <= args.warmup_steps:
        die(f"--train-rows {args.train_rows} gives {steps} steps of {args.batch}; need more than "
            f"--warmup-steps {args.warmup_steps}")
    if args.train_rows + args.eval_rows > rows:
        die(f"{args.data} has {rows} rows of d={args.d}; --train-rows {args.train_rows} + "
            f"--eval-rows {args.eval_rows} do not fit")
    data = np.memmap(args.data, dtype="<f4", mode="r", shape=(rows, args.d))

    first = torch.from_numpy(np.array(data[:args.batch]))
    init = init_params(args.d, args.n, args.seed, first, torch.float32, args.init_decoder)
    results = {}
    for impl in impls:
        log(f"training {impl}: {steps} steps of {args.batch} tokens ({args.warmup_steps} untimed)")
        results[impl] = train(impl, init, data, args, fns)
    print(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"d": args.d, "n": args.n, "k": args.k, "batch": args.batch, "train_rows": args.train_rows,
                  "eval_rows": args.eval_rows, "steps": steps, "timed_steps": steps - args.warmup_steps},
        "results": results,
    }))


if __name__ == "__main__":
    main()
