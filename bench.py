"""bench.py: measured tables for lowmem. Every number in README.md comes from here.

    python bench.py kernels [--device cpu|cuda] [--dtype float32|bfloat16] [--params 50e6] [--json]

kernels: one optimizer step (classic driver, gradients already present) over a ~50M-parameter
set of tensors: ms per step, effective GB/s (bytes the implementation must move, below) and
ratios to torch's fused AdamW, to the official packages' step, and to a plain copy measured
in the same run. The step is memory-bound, so GB/s against the copy is the figure of merit.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

import lowmem

# Bytes moved per element by each update; pb, gb = parameter and gradient bytes, state fp32.
BYTES = {
    "copy": lambda pb, gb: 2 * pb,                        # read + write
    "lomo": lambda pb, gb: 2 * pb + gb,                   # read p, g; write p
    "adamw": lambda pb, gb: 2 * pb + gb + 16,             # + read/write m and v
    "adam_mini": lambda pb, gb: 2 * pb + gb + 8,          # + read/write m (v is tiny)
    "adalomo": lambda pb, gb: 3 * pb + 3 * gb,            # g twice for the stats, p for its RMS, then apply
}


def timed(fn, device, repeats):
    """Median wall time (ms) of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_tensors(n_params, dtype, device, dim=2048):
    """Square (dim, dim) weights summing to ~n_params, with gradients."""
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(max(1, round(n_params / dim ** 2))):
        layer = nn.Module()
        layer.mlp = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        model.layers.append(layer)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def kernel_rows(n_params, dtype, device, repeats):
    model = make_tensors(n_params, dtype, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    pb = gb = torch.finfo(dtype).bits // 8
    heads = dict(n_heads=16)
    rows = []

    def add(name, kind, fn):
        ms = timed(fn, device, repeats)
        rows.append(dict(name=name, kind=kind, ms=ms, gbps=BYTES[kind](pb, gb) * n / ms / 1e6))

    copies = [torch.empty_like(p) for p in params]
    add("torch copy_ (bandwidth reference)", "copy", lambda: [c.copy_(p) for c, p in zip(copies, params)])
    del copies
    mini = lowmem.AdamMini(model, lr=1e-4, **heads)
    add(f"lowmem LOMO ({lowmem.kernels(device)})", "lomo", lowmem.LOMO(model, lr=1e-4).step)
    add(f"lowmem AdaLomo ({lowmem.kernels(device)})", "adalomo", lowmem.AdaLomo(model, lr=1e-4).step)
    add(f"lowmem Adam-mini ({lowmem.kernels(device)})", "adam_mini", mini.step)
    elementwise = lowmem.AdamMini([(f"{i}.bias", p) for i, p in enumerate(params)], lr=1e-4)
    add(f"lowmem AdamW-style, per-element v ({lowmem.kernels(device)})", "adamw", elementwise.step)
    del elementwise
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    add("torch AdamW(fused=True)", "adamw", fused.step)
    del fused
    torch_mini = lowmem.AdamMini(model, lr=1e-4, **heads)
    torch_mini._kernel_update = lambda *a: False
    add("lowmem Adam-mini (torch reference path)", "adam_mini", torch_mini.step)
    del torch_mini
    add_official(add, model, device)
    return rows, n


def add_official(add, model, device):
    try:
        import adam_mini
        official = adam_mini.Adam_mini(model.named_parameters(), lr=1e-4, dim=2048, n_heads=16, verbose=False)
        add("official adam_mini 1.1.1 step", "adam_mini", official.step)
        del official
    except ImportError:
        print("(official adam-mini not installed: row skipped)", file=sys.stderr)
    try:
        import lomo_optim
    except ImportError:
        print("(official lomo-optim not installed: rows skipped)", file=sys.stderr)
        return
    grads = {p: p.grad for p in model.parameters()}

    def official_step(opt):  # its update runs in hooks: call the hook body with grads set
        def step():
            for p, g in grads.items():
                p.grad = g
            opt.grad_func(0)
        return step
    add("official lomo_optim Lomo update", "lomo", official_step(lomo_optim.Lomo(model, lr=1e-4)))
    cuda = torch.Tensor.cuda
    if device == "cpu":  # its state is created with .cuda(): keep it on the CPU here
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        add("official lomo_optim AdaLomo update", "adalomo", official_step(lomo_optim.AdaLomo(model, lr=1e-4)))
    finally:
        torch.Tensor.cuda = cuda


def print_kernels(rows, n, args):
    by = {r["name"]: r for r in rows}
    copy_gbps = rows[0]["gbps"]
    adamw_ms = by["torch AdamW(fused=True)"]["ms"]
    official = {"adam_mini": "official adam_mini 1.1.1 step", "lomo": "official lomo_optim Lomo update",
                "adalomo": "official lomo_optim AdaLomo update"}
    print(f"one optimizer step, {n / 1e6:.1f}M {args.dtype} parameters on {args.device} "
          f"({torch.get_num_threads()} threads); median of {args.repeats}")
    print(f"{'implementation':58s} {'ms':>8s} {'GB/s':>7s} {'% copy':>7s} {'vs AdamW':>9s} {'vs official':>11s}")
    for r in rows:
        ref = by.get(official.get(r["kind"], ""))
        vs_off = f"{ref['ms'] / r['ms']:.2f}x" if ref and r["name"].startswith("lowmem") else ""
        print(f"{r['name']:58s} {r['ms']:8.2f} {r['gbps']:7.1f} {100 * r['gbps'] / copy_gbps:6.0f}% "
              f"{adamw_ms / r['ms']:8.2f}x {vs_off:>11s}")
    print("GB/s counts the bytes each update must move (bench.py BYTES); 'vs AdamW' and "
          "'vs official' are speedups (time of the other / time of this row).")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["kernels"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows, n = kernel_rows(int(args.params), getattr(torch, args.dtype), args.device, args.repeats)
    if args.json:
        print(json.dumps(dict(device=args.device, dtype=args.dtype, params=n, rows=rows), indent=1))
    else:
        print_kernels(rows, n, args)


if __name__ == "__main__":
    main()
