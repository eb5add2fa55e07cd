"""bench.py: measured tables for lowmem. Every number in README.md comes from here.

    python bench.py memory   [--model gpt|llama] [--size full|activations] [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] [--json]
    python bench.py speed    [--device cpu|cuda] [--quick] [--json]
    python bench.py converge [--quick] [--json]
    python bench.py kernels  [--device cpu|cuda] [--dtype float32|bfloat16] [--params 50e6] [--json]

memory: peak memory of a few training steps per optimizer, each in a fresh process (CPU: peak
RSS minus the RSS after the model is built, glibc told to return freed blocks; CUDA:
max_memory_allocated minus the allocation after the build), beside the accounting (parameter,
gradient and optimizer-state bytes). speed: ms per training iteration, interleaved rounds,
median, as ratios to AdamW. converge: train_gpt2's default model with each optimizer, an lr
sweep and 3 seeds, best val loss mean +- std.

kernels: one optimizer step (classic driver, gradients already present) over a ~50M-parameter
set of tensors: ms per step, effective GB/s (bytes the implementation must move, below) and
ratios to torch's fused AdamW, to the official packages' step, and to a plain copy measured
in the same run. The step is memory-bound, so GB/s against the copy is the figure of merit.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
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


# ---------------------------------------------------------------------------- models for memory / speed

SIZES = {  # (layers, width, context, batch); each memory row runs well under a minute on 2 CPU cores
    # full: weights dominate (as in fine-tuning with small batches, the papers' setting);
    # activations: the same kind of model where activations dominate instead.
    "gpt": {"full": (8, 1024, 64, 2), "activations": (8, 512, 256, 8), "quick": (2, 128, 64, 4),
            "speed": (12, 128, 128, 8), "gpu": (12, 768, 1024, 8)},
    "llama": {"full": (8, 1024, 64, 2), "activations": (8, 512, 256, 8), "quick": (2, 128, 64, 4),
              "speed": (12, 128, 128, 8), "gpu": (16, 2048, 1024, 4)},
}


def build(model_kind, size, device, dtype, seed=0):
    """A model from train_gpt2 (GPT-2 124M for size 'gpu') or train_llama, and a batch function."""
    import train_gpt2
    import train_llama
    layers, width, block, batch = SIZES[model_kind][size]
    torch.manual_seed(seed)
    if model_kind == "gpt":
        vocab = 50304 if size == "gpu" else 256
        model = train_gpt2.GPT(train_gpt2.GPTConfig(block, vocab, layers, width // 64 or 2, width))
    else:
        vocab = 32000 if size == "gpu" else 260
        model = train_llama.Llama(train_llama.LlamaConfig(vocab, width, int(width * 8 / 3) // 32 * 32, layers,
                                                          max(width // 64, 2), max(width // 128, 1)))
    model.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)

    def batch_fn():
        xy = torch.randint(vocab, (batch, block + 1), generator=gen).to(device)
        return (xy[:, :-1], xy[:, 1:]) if model_kind == "gpt" else (xy, xy)
    return model, batch_fn, batch * block


def make_opt(name, model, lr=1e-4):
    """The training scripts' optimizers (train_gpt2.make_optimizer), clipping off."""
    import train_gpt2
    cfg = dict(optimizer=name, learning_rate=lr, weight_decay=0.0, grad_clip=0, stochastic_rounding=False,
               seed=0, beta1=0.9, beta2=0.95)
    if name == "adam_mini_bf16_state":  # m in bf16, as the official package keeps it for bf16 parameters
        return lowmem.AdamMini(model, lr=lr, betas=(0.9, 0.95), state_dtype=torch.bfloat16)
    return None if name == "none" else train_gpt2.make_optimizer(model, cfg)


def train_step(model, opt, batch_fn, fused):
    loss = model(*batch_fn())[1]
    if opt is None:
        loss.backward()  # gradients freed as they arrive (hooks below): activations only
    elif fused:
        opt.fused_backward(loss)
    else:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- memory

MEMORY_ROWS = [("no optimizer (grads freed)", "none", True), ("SGD", "sgd", False), ("AdamW", "adamw", False),
               ("Adam-mini classic", "adam_mini", False), ("Adam-mini classic, bf16 m", "adam_mini_bf16_state", False),
               ("Adam-mini fused", "adam_mini", True), ("LOMO fused", "lomo", True), ("AdaLomo fused", "adalomo", True)]


def _proc_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_row(spec):
    """Runs in a fresh process: build, note the baseline, 3 training steps, note the peak."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    model, batch_fn, _ = build(spec["model"], spec["size"], device, dtype)
    _warm_up(spec, device, dtype)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    opt = make_opt(spec["optimizer"], model)
    if opt is None:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    for _ in range(spec["steps"]):
        train_step(model, opt, batch_fn, spec["fused"])
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _proc_kb("VmHWM") * 1024
    import train_gpt2
    state = 0 if opt is None else train_gpt2.state_bytes(opt)
    return dict(params=sum(sizes), grads=max(sizes) if spec["fused"] else sum(sizes), state=state,
                measured=peak - base)


def _warm_up(spec, device, dtype):
    """One step of the same optimizer on a throwaway toy model before the baseline, so that
    one-time costs (torch.optim's lazy imports, the C kernel library, OpenMP threads: ~80 MB
    on CPU) are not counted as training memory."""
    toy = nn.Sequential(nn.Embedding(8, 64), nn.Linear(64, 8)).to(device=device, dtype=dtype)
    opt = make_opt(spec["optimizer"], toy)
    loss = toy(torch.arange(8, device=device)).float().square().mean()
    if opt is None:
        loss.backward()
    elif spec["fused"]:
        opt.fused_backward(loss)
    else:
        loss.backward(), opt.step()


def memory_rows(args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # REFERENCE 6: RSS tracks live bytes
    size = "quick" if args.quick else ("gpu" if args.device == "cuda" else args.size)
    rows = []
    for dtype in [args.dtype]:
        for label, opt, fused in MEMORY_ROWS:
            if (args.quick and opt in ("sgd", "adalomo")) or (opt == "adam_mini_bf16_state" and dtype != "bfloat16"):
                continue
            spec = dict(model=args.model, size=size, device=args.device, dtype=dtype, optimizer=opt, fused=fused,
                        steps=2 if args.quick else 3)
            run = subprocess.run([sys.executable, __file__, "_memory_row", json.dumps(spec)], env=env,
                                 capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"memory row {label} {dtype} failed:\n{run.stderr[-2000:]}")
            rows.append(dict(json.loads(run.stdout.strip().splitlines()[-1]), name=label, dtype=dtype))
    for dtype in {r["dtype"] for r in rows}:  # accounting: params + grads + state + activations
        group = [r for r in rows if r["dtype"] == dtype]
        act = group[0]["measured"] - group[0]["grads"]  # the no-optimizer row: activations + one grad
        adamw = next(r for r in group if r["name"] == "AdamW")
        for r in group:
            r["act_other"] = r["measured"] - r["grads"] - r["state"]
            r["total"] = r["params"] + r["measured"]
            r["accounted"] = r["params"] + r["grads"] + r["state"] + act
        for r in group:
            r["vs_adamw"] = r["total"] / adamw["total"]
    return rows, size


def print_memory(rows, args, size):
    layers, width, block, batch = SIZES[args.model][size]
    mb = lambda b: f"{b / 2 ** 20:9.1f}"  # noqa: E731
    where = "peak RSS - RSS after build" if args.device == "cpu" else "max_memory_allocated - allocated after build"
    print(f"{args.model} {layers}x{width}, context {block}, batch {batch} on {args.device}; {2 if args.quick else 3} steps; "
          f"measured = {where}; MiB")
    print(f"{'optimizer':28s} {'dtype':9s} {'params':>9s} {'grads':>9s} {'opt state':>9s} {'act+other':>9s} "
          f"{'total':>9s} {'accounted':>9s} {'vs AdamW':>8s}")
    for r in rows:
        print(f"{r['name']:28s} {r['dtype']:9s} {mb(r['params'])} {mb(r['grads'])} {mb(r['state'])} "
              f"{mb(r['act_other'])} {mb(r['total'])} {mb(r['accounted'])} {r['vs_adamw']:7.2f}x")
    print("grads/opt state are accounting (largest gradient for fused drivers, state_bytes()); total = params +"
          " measured; accounted = params + grads + state + the no-optimizer row's activations.")


# ---------------------------------------------------------------------------- speed

SPEED_ROWS = [("SGD classic", "sgd", False), ("AdamW classic", "adamw", False),
              ("Adam-mini classic", "adam_mini", False), ("Adam-mini fused", "adam_mini", True),
              ("LOMO classic", "lomo", False), ("LOMO fused", "lomo", True),
              ("AdaLomo classic", "adalomo", False), ("AdaLomo fused", "adalomo", True)]


def official_rows(device):
    """Step functions of the official packages (skipped when not installed)."""
    rows = []
    try:
        import adam_mini
        rows.append(("official adam_mini 1.1.1", lambda m: adam_mini.Adam_mini(
            m.named_parameters(), lr=1e-4, dim=m.config.n_embd, n_heads=m.config.n_head, verbose=False), False))
    except ImportError:
        pass
    try:
        import lomo_optim
        rows.append(("official lomo_optim Lomo", lambda m: lomo_optim.Lomo(m, lr=1e-4), True))
        rows.append(("official lomo_optim AdaLomo", lambda m: lomo_optim.AdaLomo(m, lr=1e-4), True))
    except ImportError:
        pass
    return rows


def speed_rows(args):
    size = "quick" if args.quick else ("gpu" if args.device == "cuda" else "speed")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base, batch_fn, tokens = build("gpt", size, args.device, dtype)
    configs = []
    for label, name, fused in SPEED_ROWS:
        model = copy.deepcopy(base)
        configs.append((label, model, make_opt(name, model), fused, False))
    cuda = torch.Tensor.cuda
    if args.device == "cpu":  # the official AdaLomo allocates state with .cuda(): keep it on the CPU
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        for label, make, fused in official_rows(args.device):
            model = copy.deepcopy(base)
            configs.append((label, model, make(model), fused, True))
        times = {c[0]: [] for c in configs}
        rounds, iters = (2, 2) if args.quick else (5, 3)
        for _ in range(rounds):  # interleaved: machine noise hits every row alike
            for label, model, opt, fused, official in configs:
                times[label].append(timed_iters(model, opt, batch_fn, fused, official, iters, args.device))
    finally:
        torch.Tensor.cuda = cuda
    adamw = statistics.median(times["AdamW classic"])
    n_tensors = len(list(base.parameters()))
    return [dict(name=k, ms=statistics.median(v), tok_s=tokens / statistics.median(v) * 1e3,
                 vs_adamw=statistics.median(v) / adamw) for k, v in times.items()], size, n_tensors


def timed_iters(model, opt, batch_fn, fused, official, iters, device):
    """ms per training iteration, after one warm-up iteration."""
    def one():
        if official and fused:  # lomo_optim's own API: fused_backward(loss, lr)
            opt.fused_backward(model(*batch_fn())[1], 1e-4)
        else:
            train_step(model, opt, batch_fn, fused)
    one()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def print_speed(rows, args, size, n_tensors):
    layers, width, block, batch = SIZES["gpt"][size]
    print(f"gpt {layers}x{width} ({n_tensors} tensors), context {block}, batch {batch} on {args.device} "
          f"({torch.get_num_threads()} threads); clipping off; median of interleaved rounds")
    print(f"{'optimizer':30s} {'ms/iter':>9s} {'tokens/s':>10s} {'vs AdamW':>9s}")
    for r in rows:
        print(f"{r['name']:30s} {r['ms']:9.1f} {r['tok_s']:10,.0f} {r['vs_adamw']:8.2f}x")
    print("vs AdamW: time of this row / time of AdamW classic (lower is faster).")


# ---------------------------------------------------------------------------- converge

def converge_rows(args):
    """Best (over an lr sweep at seed 0) val loss per optimizer, then that lr at 3 seeds."""
    import train_gpt2
    quick = dict(n_layer=2, n_embd=64, n_head=2, block_size=64, max_iters=30, eval_interval=30,
                 log_interval=10, warmup_iters=5, eval_iters=4)
    base = quick if args.quick else dict(max_iters=args.iters, eval_interval=args.iters, log_interval=25)
    seeds, factors = ((0, 1), (1.0,)) if args.quick else ((0, 1, 2), (0.5, 1.0, 2.0))
    optimizers = ("adamw", "adam_mini", "lomo") if args.quick else train_gpt2.OPTIMIZERS
    results = []
    for name in optimizers:
        runs = {}
        for f in factors:
            lr = train_gpt2.DEFAULT_LR[name] * f
            runs[lr] = [_converge_run(train_gpt2, base, name, lr, 0)]
        best_lr = min(runs, key=lambda lr: runs[lr][0]["best_val"])
        runs[best_lr] += [_converge_run(train_gpt2, base, name, best_lr, s) for s in seeds[1:]]
        vals = [h["best_val"] for h in runs[best_lr]]
        results.append(dict(optimizer=name, lr=best_lr, sweep={str(lr): r[0]["best_val"] for lr, r in runs.items()},
                            mean=statistics.mean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            seeds=vals, curve=runs[best_lr][0]["train"]))
    adamw = next(r["mean"] for r in results if r["optimizer"] == "adamw")
    for r in results:
        r["vs_adamw"] = r["mean"] / adamw
    return results, base


def _converge_run(train_gpt2, base, name, lr, seed):
    import contextlib
    args = [f"--{k}={v}" for k, v in dict(base, optimizer=repr(name), learning_rate=lr, seed=1337 + seed,
                                          sample_tokens=0, out_dir=repr(f"/tmp/lowmem-converge-{os.getpid()}"), overwrite=True,
                                          device=repr("cpu")).items()]
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        h = train_gpt2.train(train_gpt2.parse_config(args))
    print(f"  {name:9s} lr {lr:<8.3g} seed {seed}: best val {h['best_val']:.4f}", file=sys.stderr)
    return h


def print_converge(results, base, args):
    n_seeds, sweep = (2, "1x") if args.quick else (3, "0.5x, 1x, 2x")
    print(f"train_gpt2 default model{' (quick: tiny)' if args.quick else ''}, {base['max_iters']} iters, "
          f"lr sweep at seed 0 ({sweep} DEFAULT_LR), best lr at {n_seeds} seeds; val loss (bytes, nats)")
    print(f"{'optimizer':10s} {'best lr':>8s} {'val loss':>16s} {'vs AdamW':>9s}  sweep (lr: val)")
    for r in results:
        sweep = ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in r["sweep"].items())
        print(f"{r['optimizer']:10s} {r['lr']:8.3g} {r['mean']:9.4f} +- {r['std']:.4f} {r['vs_adamw']:8.3f}x  {sweep}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no assets/loss_curves.png)")
        return
    os.makedirs("assets", exist_ok=True)
    for r in results:
        plt.plot(*zip(*r["curve"]), label=f"{r['optimizer']} (lr {r['lr']:g})")
    plt.xlabel("iteration"), plt.ylabel("train loss"), plt.legend(), plt.title("train_gpt2 default model, seed 0")
    plt.savefig("assets/loss_curves.png", dpi=120)
    print("wrote assets/loss_curves.png")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "_memory_row":  # the fresh process of one memory row
        print(json.dumps(memory_row(json.loads(sys.argv[2]))))
        return
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    ap.add_argument("command", choices=["memory", "speed", "converge", "kernels"], help="which table to measure")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--model", default="gpt", choices=["gpt", "llama"], help="memory: train_gpt2's or train_llama's model")
    ap.add_argument("--size", default="full", choices=["full", "activations"], help="memory: which model (SIZES)")
    ap.add_argument("--params", type=float, default=50e6, help="kernels: parameters in the tensor set")
    ap.add_argument("--repeats", type=int, default=7, help="kernels: timed steps (the median is shown)")
    ap.add_argument("--iters", type=int, default=150, help="converge: iterations per run")
    ap.add_argument("--quick", action="store_true", help="a reduced run of about a minute")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    if args.command == "memory":
        rows, size = memory_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_memory(rows, args, size)
    elif args.command == "speed":
        rows, size, n_tensors = speed_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_speed(rows, args, size, n_tensors)
    elif args.command == "converge":
        results, base = converge_rows(args)
        print(json.dumps(results, indent=1)) if args.json else print_converge(results, base, args)
    else:
        rows, n = kernel_rows(int(args.params), getattr(torch, args.dtype), args.device, args.repeats)
        if args.json:
            print(json.dumps(dict(device=args.device, dtype=args.dtype, params=n, rows=rows), indent=1))
        else:
            print_kernels(rows, n, args)


if __name__ == "__main__":
    main()
