"""bench.py: measured tables for lowmem. Every number in README.md and RESULTS.md comes from here.

    python bench.py memory   [--model gpt|llama] [--size full|activations|plan] [--device cpu|cuda] [--dtype float32|bfloat16] [--world N] [--quick] [--json]
    python bench.py speed    [--device cpu|cuda] [--quick] [--json]
    python bench.py ablation [--iters 1500] [--seeds 3]     # Adam-mini's partition and beta2, one change at a time
    python bench.py converge [--iters 1500] [--factors 0.5,1,2] [--seeds 3] [--optimizers ...] [--quick] [--json]
    python bench.py state    [--model gpt|llama] [--seeds 3] [--arms ...] [--drift]  # Adam-mini's m in fp32, bf16, 8 bits
    python bench.py accumulate [--iters 1500] [--seeds 3] [--optimizers ...] [--ratio]  # fused drivers' gradient accumulation
    python bench.py kernels  [--device cpu|cuda] [--dtype float32|bfloat16] [--params 50e6] [--shape square|llama|small] [--json]
    python bench.py gpu      [--report gpu_report.md]    # on a GPU machine: every GPU check, one report
    python bench.py plan     [CONFIG] [--batch 8] [--seq 512] [--dtype ...] [--world N]   # will it fit (per rank: FSDP2)

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
import contextlib
import copy
import functools
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lowmem

# Bytes moved per element by each update; pb, gb = parameter and gradient bytes, state fp32.
BYTES = {
    "copy": lambda pb, gb: 2 * pb,                        # read + write
    "lomo": lambda pb, gb: 2 * pb + gb,                   # read p, g; write p
    "adamw": lambda pb, gb: 2 * pb + gb + 16,             # + read/write m and v
    "adam_mini": lambda pb, gb: 2 * pb + gb + 8,          # + read/write m (v is tiny)
    "adam_mini_bf16_state": lambda pb, gb: 2 * pb + gb + 4,   # m in bf16
    "adam_mini_8bit_state": lambda pb, gb: 2 * pb + gb + 2 + 8 / 256,  # m in 8 bits, a 4-byte scale per 256
    "adalomo": lambda pb, gb: 3 * pb + 3 * gb,            # g twice for the stats, p for its RMS, then apply
}


def timed(fn, device, repeats):
    """Median wall time (ms) of fn() after one warm-up call (repeats=0: one call, timed)."""
    return timed_in_turns([fn], device, repeats)[0]


def timed_in_turns(fns, device, repeats):
    """timed() of each fn, taking turns: each round calls every fn once, so a slow spell of a
    shared machine falls on all of them alike and their ratios hold."""
    if repeats:
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(max(repeats, 1)):
        for fn, ts in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


KERNEL_SHAPES = {  # --shape: (what the tensor set is, the official adam_mini's dim / n_heads for it)
    "square": ("(2048, 2048) weights summing to ~--params", dict(dim=2048, n_heads=16)),
    "llama": ("train_llama's model, vocab 8192, 8 layers x 512, 33M parameters in 75 tensors", dict(dim=512, n_heads=8)),
    "small": ("500 tensors of (64, 64): per-tensor host cost", dict(dim=64, n_heads=1)),
}


def make_tensors(shape, n_params, dtype, device):
    """The tensor set of `bench.py kernels --shape`, with gradients."""
    import train_llama
    torch.manual_seed(0)
    with torch.device(device):
        if shape == "llama":
            model = train_llama.Llama(train_llama.LlamaConfig(8192, 512, 1344, 8, 8, 8))
        else:
            dim, count = (64, 500) if shape == "small" else (2048, max(1, round(n_params / 2048 ** 2)))
            model = nn.Module()
            model.layers = nn.ModuleList(nn.ModuleDict(dict(mlp=nn.Linear(dim, dim, bias=False))) for _ in range(count))
    model.to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def kernel_rows(n_params, dtype, device, repeats, shape="square"):
    model = make_tensors(shape, n_params, dtype, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    pb = gb = torch.finfo(dtype).bits // 8
    official = KERNEL_SHAPES[shape][1]
    heads = {} if shape == "llama" else dict(n_heads=official["n_heads"])  # the Llama's config has its heads
    rows = []

    def add(names, kinds, fns):  # one row, or rows timed in turns (a comparison that must hold)
        if isinstance(names, str):
            names, kinds, fns = [names], [kinds], [fns]
        for name, kind, ms in zip(names, kinds, timed_in_turns(fns, device, repeats)):
            rows.append(dict(name=name, kind=kind, ms=ms, gbps=BYTES[kind](pb, gb) * n / ms / 1e6, us_per_tensor=ms * 1e3 / len(params)))

    copies = [torch.empty_like(p) for p in params]
    add("torch copy_ (bandwidth reference)", "copy", lambda: [c.copy_(p) for c, p in zip(copies, params)])
    del copies
    mini = lowmem.AdamMini(model, lr=1e-4, **heads)
    lomo, adalomo = lowmem.LOMO(model, lr=1e-4), lowmem.AdaLomo(model, lr=1e-4)
    add(f"lowmem LOMO ({lowmem.kernels(device)})", "lomo", lomo.step)
    add(f"lowmem AdaLomo ({lowmem.kernels(device)})", "adalomo", adalomo.step)
    small_m = [lowmem.AdamMini(model, lr=1e-4, state_dtype=dtype, **heads) for dtype in (torch.bfloat16, torch.int8)]
    add([f"lowmem Adam-mini{label} ({lowmem.kernels(device)})" for label in ("", ", bf16 m", ", 8-bit m")],  # in turns
        ["adam_mini", "adam_mini_bf16_state", "adam_mini_8bit_state"], [mini.step] + [o.step for o in small_m])
    del small_m
    for name, kind, opt in (("LOMO", "lomo", lomo), ("AdaLomo", "adalomo", adalomo), ("Adam-mini", "adam_mini", mini)):
        add(f"lowmem {name}, one call per tensor (as in a hook)", kind, hook_calls(opt, params))
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
    add_official(add, model, device, official)
    return rows, n


def hook_calls(opt, params):
    """Every tensor updated the way the fused drivers' hook updates it: one kernel call each."""
    def update():
        for p in params:
            opt._apply(p, p.grad, 1.0, None, None)
    return update


def add_official(add, model, device, heads):
    try:
        import adam_mini
        official = adam_mini.Adam_mini(model.named_parameters(), lr=1e-4, **heads, verbose=False)
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
    print(f"one optimizer step, {n / 1e6:.1f}M {args.dtype} parameters on {args.device}, "
          f"{KERNEL_SHAPES[getattr(args, 'shape', 'square')][0]} "
          f"({torch.get_num_threads()} threads); median of {args.repeats}")
    print(f"{'implementation':58s} {'ms':>8s} {'GB/s':>7s} {'% copy':>7s} {'vs AdamW':>9s} {'vs official':>11s}")
    for r in rows:
        ref = by.get(official.get(r["kind"], ""))
        vs_off = f"{ref['ms'] / r['ms']:.2f}x" if ref and r["name"].startswith("lowmem") else ""
        print(f"{r['name']:58s} {r['ms']:8.2f} {r['gbps']:7.1f} {100 * r['gbps'] / copy_gbps:6.0f}% "
              f"{adamw_ms / r['ms']:8.2f}x {vs_off:>11s}")
    print("GB/s counts the bytes each update must move (bench.py BYTES); 'vs AdamW' and "
          "'vs official' are speedups (time of the other / time of this row).")
    mini = [by[f"lowmem Adam-mini{label} ({lowmem.kernels(args.device)})"]["ms"] for label in ("", ", bf16 m", ", 8-bit m")]
    print(f"Adam-mini's forms of m, timed in turns: bf16 m {mini[1] / mini[0]:.2f}x, 8-bit m {mini[2] / mini[0]:.2f}x the fp32 m step")
    print("per tensor, one call each (what a fused driver's hook pays, host and kernel): " + ", ".join(
        f"{r['name'].removeprefix('lowmem ').split(',')[0]} {r['us_per_tensor']:.1f} us" for r in rows if "one call per tensor" in r["name"]))


# ---------------------------------------------------------------------------- models for memory / speed

SIZES = {  # (layers, width, context, batch); each memory row runs well under a minute on 2 CPU cores
    # full: weights dominate (as in fine-tuning with small batches, the papers' setting);
    # activations: the same kind of model where activations dominate instead.
    "gpt": {"full": (8, 1024, 64, 2), "activations": (8, 512, 256, 8), "quick": (2, 128, 64, 4), "plan": (4, 512, 64, 4),
            "speed": (12, 128, 128, 8), "gpu": (12, 768, 1024, 8)},
    "llama": {"full": (8, 1024, 64, 2), "activations": (8, 512, 256, 8), "quick": (2, 128, 64, 4), "plan": (4, 512, 64, 4),
              "speed": (12, 128, 128, 8), "gpu": (16, 2048, 1024, 4), "1b": (16, 2048, 512, 4)},
}
# Llama-3.2-1B's published config.json (random init here: nothing is downloaded).
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=dict(
                        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192))


def model_config(model_kind, size):
    """The config of a SIZES model: train_gpt2's GPTConfig fields, or a LLaMA config.json dict."""
    layers, width, block, batch = SIZES[model_kind][size]
    if model_kind == "gpt":
        return dict(block_size=block, vocab_size=50304 if size == "gpu" else 256, n_layer=layers,
                    n_head=width // 64 or 2, n_embd=width)
    if size == "1b":
        return LLAMA_3_2_1B
    return dict(vocab_size=32000 if size == "gpu" else 260, hidden_size=width,
                intermediate_size=int(width * 8 / 3) // 32 * 32, num_hidden_layers=layers,
                num_attention_heads=max(width // 64, 2), num_key_value_heads=max(width // 128, 1))


def make_model(config):
    """train_gpt2's GPT (GPTConfig fields or a Hugging Face GPT-2 config.json) or train_llama's Llama."""
    import train_gpt2
    import train_llama
    if "block_size" in config:
        return train_gpt2.GPT(train_gpt2.GPTConfig(**config))
    if config.get("model_type") == "gpt2":
        return train_gpt2.GPT(train_gpt2.GPTConfig(config["n_positions"], config["vocab_size"], config["n_layer"],
                                                   config["n_head"], config["n_embd"], activation_checkpointing=
                                                   config.get("activation_checkpointing", False)))
    return train_llama.Llama(train_llama.LlamaConfig.from_hf(config))


def batch_fn_for(model, batch, seq, device, gen=None):
    """Random tokens in the model's forward signature: GPT (idx, targets), Llama (idx, labels)."""
    vocab = model.config.vocab_size

    def batch_fn():
        if device == "meta":
            xy = torch.zeros(batch, seq + 1, dtype=torch.long, device="meta")
        else:
            xy = torch.randint(vocab, (batch, seq + 1), generator=gen).to(device)
        return (xy[:, :-1], xy[:, 1:]) if "block_size" in vars(model.config) else (xy[:, :-1], xy[:, :-1])
    return batch_fn


def build(model_kind, size, device, dtype, seed=0):
    """A model from train_gpt2 (GPT-2 124M for size 'gpu') or train_llama, and a batch function."""
    layers, width, block, batch = SIZES[model_kind][size]
    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it trains: a 1B model's init is slow on the CPU
        model = make_model(model_config(model_kind, size))
    model.to(dtype=dtype)
    return model, batch_fn_for(model, batch, block, device, torch.Generator().manual_seed(seed)), batch * block


def make_opt(name, model, lr=1e-4, fused=False):
    """The training scripts' optimizers (train_gpt2.make_optimizer), clipping off; fused = k > 1
    (an int): the fused driver accumulating k micro-batches a step."""
    import train_gpt2
    cfg = dict(optimizer=name, learning_rate=lr, weight_decay=0.0, grad_clip=0, stochastic_rounding=False,
               seed=0, beta1=0.9, beta2=0.95, fused=bool(fused), gradient_accumulation_steps=int(fused) or 1)
    for state in ("bf16", "8bit"):  # Adam-mini with its first moment in bf16 or 8 bits
        if name == f"adam_mini_{state}_state":
            name, cfg["adam_mini_state"] = "adam_mini", {"bf16": "bfloat16", "8bit": "int8"}[state]
    return None if name == "none" else train_gpt2.make_optimizer(model, dict(cfg, optimizer=name))


def train_step(model, opt, batch_fn, fused):
    """One optimizer step; fused = k > 1 (an int): k micro-batches, each its own fused_backward."""
    if fused > 1:
        for _ in range(fused):
            opt.fused_backward(model(*batch_fn())[1] / fused)
        return
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
               ("Adam-mini fused", "adam_mini", True), ("Adam-mini fused, bf16 m", "adam_mini_bf16_state", True),
               ("Adam-mini fused, 8-bit m", "adam_mini_8bit_state", True), ("LOMO fused", "lomo", True),
               ("AdaLomo fused", "adalomo", True),
               ("Adam-mini fused, accumulating 4", "adam_mini", 4), ("AdaLomo fused, accumulating 4", "adalomo", 4)]


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _free_grads_on_arrival(model):
    """The no-optimizer rows: each gradient is freed as soon as it is complete (activations only)."""
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def _accounting(sizes, opt, fused):
    """Parameter, gradient (the largest one for fused drivers and no optimizer) and state bytes."""
    import train_gpt2
    return dict(params=sum(sizes), grads=max(sizes) if fused or opt is None else sum(sizes),
                state=0 if opt is None else train_gpt2.state_bytes(opt))


def memory_row(spec):
    """Runs in a fresh process: build, note the baseline, 3 training steps, note the peak.
    With spec["world"] > 1 it is one rank under torchrun, the model sharded with FSDP2."""
    import train_gpt2
    device, dtype, world = spec["device"], getattr(torch, spec["dtype"]), spec.get("world", 1)
    if world > 1:
        train_gpt2.setup_device(device)  # joins the process group (gloo on the CPU)
    model, batch_fn, _ = build(spec["model"], spec["size"], device, dtype)
    if world > 1:
        train_gpt2.shard_model(model)
    _warm_up(spec, device, dtype, model, batch_fn)
    sizes = [p.numel() * p.element_size() for p in (p.to_local() if world > 1 else p for p in model.parameters())]
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    opt = make_opt(spec["optimizer"], model, fused=spec["fused"])
    if opt is None:
        _free_grads_on_arrival(model)
    times = []
    for _ in range(spec["steps"]):
        times.append(timed(lambda: train_step(model, opt, batch_fn, spec["fused"]), device, 0))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _proc_kb("VmHWM") * 1024
    row = dict(_accounting(sizes, opt, spec["fused"]), measured=peak - base,
               ms=statistics.median(times[1:]))  # the first step warms up
    if world > 1:  # the fullest rank's figures
        rows = [None] * world
        torch.distributed.all_gather_object(rows, row)
        row = max(rows, key=lambda r: r["measured"])
    train_gpt2.leave_process_group(world)
    return row


def _warm_up(spec, device, dtype, model, batch_fn):
    """One step of the same optimizer on a throwaway toy model, and one forward and backward of
    the model itself, before the baseline, so that one-time costs are not counted as training
    memory: torch.optim's lazy imports, the C kernel library, OpenMP threads (~80 MB on CPU),
    and the matmul library's code and scratch for each shape (oneDNN's bf16 kernels: ~20 MB)."""
    model(*batch_fn())[1].backward()
    model.zero_grad(set_to_none=True)
    toy = nn.Sequential(nn.Embedding(8, 64), nn.Linear(64, 8)).to(device=device, dtype=dtype)
    opt = make_opt(spec["optimizer"], toy, fused=spec["fused"])
    for _ in range(max(1, int(spec["fused"]))):  # an accumulated step: its micro-batches
        loss = toy(torch.arange(8, device=device)).float().square().mean()
        if opt is None:
            loss.backward()
        elif spec["fused"]:
            opt.fused_backward(loss)
        else:
            loss.backward(), opt.step()


def memory_rows(args, size=None, names=None):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # DESIGN.md "Measuring memory": RSS tracks live bytes
    size = size or args.size or ("quick" if args.quick else "gpu" if args.device == "cuda" else "full")
    rows = []
    for dtype in [args.dtype]:
        for label, opt, fused in MEMORY_ROWS:
            if (args.quick and (opt in ("sgd", "adalomo") or fused > 1)) or \
                    (label == "Adam-mini classic, bf16 m" and dtype != "bfloat16") \
                    or (names and label not in names):
                continue
            spec = dict(model=args.model, size=size, device=args.device, dtype=dtype, optimizer=opt, fused=fused,
                        steps=2 if args.quick else 3, world=args.world)
            launch = [sys.executable] if args.world == 1 else [  # one rank per process, as torchrun starts them
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world}", f"--master_port={_free_port()}"]
            run = subprocess.run([*launch, __file__, "_memory_row", json.dumps(spec)], env=env,
                                 capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"memory row {label} {dtype} failed:\n{run.stderr[-2000:]}")
            rows.append(dict(json.loads(run.stdout.strip().splitlines()[-1]), name=label, dtype=dtype))
            layers, width, block, batch = SIZES[args.model][size]  # the plan of the same run, on the meta device
            rows[-1]["plan"] = plan_peak(model_config(args.model, size), opt, fused, batch, block,
                                         getattr(torch, dtype), world=args.world)["peak"]
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
    ranks = f"; per rank of {args.world} (FSDP2), the fullest" if args.world > 1 else ""
    print(f"{args.model} {layers}x{width}, context {block}, batch {batch} on {args.device}; {2 if args.quick else 3} steps; "
          f"measured = {where}{ranks}; MiB")
    print(f"{'optimizer':28s} {'dtype':9s} {'params':>9s} {'grads':>9s} {'opt state':>9s} {'act+other':>9s} "
          f"{'total':>9s} {'accounted':>9s} {'vs AdamW':>8s}" + (f" {'plan':>9s} {'plan/total':>10s}" if "plan" in rows[0] else ""))
    for r in rows:
        plan = f" {mb(r['plan'])} {r['plan'] / r['total']:10.3f}" if "plan" in r else ""
        print(f"{r['name']:28s} {r['dtype']:9s} {mb(r['params'])} {mb(r['grads'])} {mb(r['state'])} "
              f"{mb(r['act_other'])} {mb(r['total'])} {mb(r['accounted'])} {r['vs_adamw']:7.2f}x" + plan)
    print("grads/opt state are accounting (largest gradient for fused drivers, state_bytes()); total = params +"
          " measured; accounted = params + grads + state + the no-optimizer row's activations; plan = bench.py plan's"
          " peak for the same run (meta device, nothing allocated).")


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
    """Best (over an lr sweep at seed 0) val loss per optimizer, then that lr at more seeds."""
    import train_gpt2
    quick = dict(n_layer=2, n_embd=64, n_head=2, block_size=64, max_iters=30, eval_interval=30,
                 log_interval=10, warmup_iters=5, eval_iters=4)
    base = quick if args.quick else _default_run(args.iters)
    factors = (1.0,) if args.quick else _factors(args.factors)
    optimizers = ("adamw", "adam_mini", "lomo") if args.quick else args.optimizers.split(",")
    results = tune({name: train_gpt2.DEFAULT_LR[name] for name in optimizers}, factors, range(2 if args.quick else args.seeds),
                   lambda name, lr, seed: _converge_run(train_gpt2, base, name, lr, seed))
    results = [dict(optimizer=name, **r) for name, r in results.items()]
    adamw = next((r["mean"] for r in results if r["optimizer"] == "adamw"), None)
    for r in results:
        r["vs_adamw"] = r["mean"] / adamw if adamw else None
    return results, base


def _default_run(iters):
    return dict(max_iters=iters, eval_interval=max(iters // 6, 1), log_interval=25)


def _factors(text):
    return tuple(float(f) for f in text.split(","))


def tune(arms, factors, seeds, run):
    """For each arm (an optimizer or a variant) with its default lr: an lr sweep (factors x lr)
    at the first seed, then the best lr at the other seeds. The seeds go round all the arms in
    turn, so an interrupted run has every arm at the seeds it reached. run(arm, lr, seed) ->
    history."""
    first = {arm: {lr * f: run(arm, lr * f, seeds[0]) for f in factors} for arm, lr in arms.items()}
    best = {arm: min(runs, key=lambda lr: runs[lr]["best_val"]) for arm, runs in first.items()}
    histories = {arm: [first[arm][best[arm]]] for arm in arms}
    for seed in seeds[1:]:
        for arm in arms:
            histories[arm].append(run(arm, best[arm], seed))
    results = {}
    for arm, hs in histories.items():
        vals = [h["best_val"] for h in hs]
        results[arm] = dict(lr=best[arm], sweep={str(lr): h["best_val"] for lr, h in first[arm].items()}, seeds=vals,
                            mean=statistics.mean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            curve=hs[0]["val"])
    return results


def _converge_run(train_gpt2, base, name, lr, seed, label=None):
    import contextlib
    args = [f"--{k}={v}" for k, v in dict(base, optimizer=repr(name), learning_rate=lr, seed=1337 + seed,
                                          sample_tokens=0, out_dir=repr(f"/tmp/lowmem-converge-{os.getpid()}"), overwrite=True,
                                          device=repr("cpu")).items()]
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        h = train_gpt2.train(train_gpt2.parse_config(args))
    print(f"  {label or name:9s} lr {lr:<8.3g} seed {seed}: best val {h['best_val']:.4f}", file=sys.stderr, flush=True)
    return h


STATE_ARMS = {  # Adam-mini's first moment m: (train scripts' adam_mini_state, AdamMini.m_rounding)
    "fp32 m": ("float32", "stochastic"), "bf16 m, stochastic": ("bfloat16", "stochastic"),
    "bf16 m, nearest": ("bfloat16", "nearest"), "8-bit m, stochastic": ("int8", "stochastic"),
    "8-bit m, nearest": ("int8", "nearest")}


def state_rows(args):
    """Adam-mini with m in each STATE_ARMS form, at the same lr and seeds: the default train_gpt2
    run (its DEFAULT_LR) or train_llama's offline demo (pre-training and fine-tuning, its DEMO_LR).
    Best val loss per seed; the seeds go round the arms in turn."""
    import train_gpt2
    import train_llama
    arms = [a for a in STATE_ARMS if not args.arms or any(w in a for w in args.arms.split(","))]
    script = train_llama if args.model == "llama" else train_gpt2
    base = dict(max_iters=args.iters) if args.model == "gpt" else {}
    vals = {arm: [] for arm in arms}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm in arms:
            state, rounding = STATE_ARMS[arm]
            argv = [f"--{k}={v}" for k, v in dict(base, optimizer="'adam_mini'", adam_mini_state=repr(state), seed=1337 + seed,
                                                  out_dir=repr(f"/tmp/lowmem-state-{os.getpid()}"), overwrite=True,
                                                  device="'cpu'").items()]
            saved, lowmem.AdamMini.m_rounding = lowmem.AdamMini.m_rounding, rounding
            try:
                with contextlib.redirect_stdout(open(os.devnull, "w")):
                    h = script.train(script.parse_config(argv) if script is train_gpt2 else
                                     train_gpt2.parse_config(argv, train_llama.DEFAULTS, train_llama.OPTIONAL,
                                                             train_llama.validate, train_llama.__file__))
            finally:
                lowmem.AdamMini.m_rounding = saved
            vals[arm].append(h["best_val"])
            print(f"  {arm:20s} seed {seed}: best val {h['best_val']:.4f}", file=sys.stderr, flush=True)
    ref = statistics.mean(vals[arms[0]])
    return [dict(arm=a, seeds=v, mean=statistics.mean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0,
                 vs_first=statistics.mean(v) / ref) for a, v in vals.items()]


def m_drift_rows(args):
    """How far a bf16 or 8-bit m drifts from the exact m: the default train_gpt2 run with Adam-mini
    (fp32 m) for args.iters steps, and beside it, fed the same (1-beta1)*g each step, a copy of
    every matrix's m kept in each STATE_ARMS form (the rules' rounding: lowmem.quantize_blocks,
    or bf16). Every 100 steps: ||m_kept - m|| / ||m|| over all matrices, and the part of m_kept
    along m, <m_kept, m> / <m, m> (1: unbiased; under 1: m_kept lags or shrinks)."""
    import train_gpt2
    arms = [a for a in STATE_ARMS if a != "fp32 m"]
    gen, rows, olds = torch.Generator().manual_seed(0), [], {}

    def keep(rounding, m, kept):  # kept m <- its form of m (in place); returns it in fp32
        noise = rounding == "stochastic"
        if kept.dtype == torch.int8:
            scales = kept_scales[id(kept)]
            lowmem.quantize_blocks(m, kept, scales, torch.rand((*scales.shape, 256), generator=gen) if noise else None)
            return lowmem.dequantize_blocks(kept, scales)
        kept.copy_(lowmem._stochastic_round_bf16(m, gen) if noise else m)
        return kept.float()

    kept, kept_scales = {}, {}

    def before(opt, *_):
        olds.update({p: s["m"].clone() for p, s in opt.state.items() if p.dim() >= 2})

    def after(opt, *_):
        b1, step = opt.param_groups[0]["betas"][0], next(iter(opt.state.values()))["step"]
        err, dot, norm = {a: 0.0 for a in arms}, {a: 0.0 for a in arms}, 0.0
        for p, s in opt.state.items():
            if p.dim() < 2:
                continue
            new = s["m"] - b1 * olds.get(p, torch.zeros_like(s["m"]))  # (1-b1)*g, as the optimizer took it
            norm += s["m"].square().sum().item()
            for arm in arms:
                state, rounding = STATE_ARMS[arm]
                if (p, arm) not in kept:
                    kept[p, arm] = torch.zeros_like(p, dtype=getattr(torch, state))
                    kept_scales[id(kept[p, arm])] = torch.zeros(p.shape[0], -(-p[0].numel() // 256))
                    olds_kept = torch.zeros_like(p)
                else:
                    k = kept[p, arm]
                    olds_kept = lowmem.dequantize_blocks(k, kept_scales[id(k)]) if k.dtype == torch.int8 else k.float()
                m_kept = keep(rounding, olds_kept * b1 + new, kept[p, arm])
                err[arm] += (m_kept - s["m"]).square().sum().item()
                dot[arm] += (m_kept * s["m"]).sum().item()
        if step % 100 == 0:
            rows.extend(dict(step=step, arm=a, rel_err=math.sqrt(err[a] / norm), along=dot[a] / norm) for a in arms)
            print(f"  step {step}: " + ", ".join(f"{a} {math.sqrt(err[a] / norm):.4f}" for a in arms), file=sys.stderr, flush=True)

    import lowmem as lm
    saved = lm.AdamMini.__init__

    def with_hooks(self, *a, **kw):
        saved(self, *a, **kw)
        self.register_step_pre_hook(before), self.register_step_post_hook(after)
    lm.AdamMini.__init__ = with_hooks
    try:
        argv = [f"--{k}={v}" for k, v in dict(max_iters=args.iters, optimizer="'adam_mini'", device="'cpu'", sample_tokens=0,
                                              out_dir=repr(f"/tmp/lowmem-drift-{os.getpid()}"), overwrite=True).items()]
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            train_gpt2.train(train_gpt2.parse_config(argv))
    finally:
        lm.AdamMini.__init__ = saved
    return rows


def print_m_drift(rows, args):
    print(f"Adam-mini's m kept in bf16 or 8 bits beside the exact fp32 m, the default train_gpt2 run ({args.iters} iters), "
          "every matrix; rel err = ||m_kept - m|| / ||m||, along = <m_kept, m> / <m, m>")
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    print(f"{'step':>6s}" + "".join(f"  {a + ': rel err, along':>36s}" for a in arms))
    for step in sorted({r["step"] for r in rows}):
        by = {r["arm"]: r for r in rows if r["step"] == step}
        print(f"{step:6d}" + "".join(f"  {by[a]['rel_err']:26.4f} {by[a]['along']:9.4f}" for a in arms))


ACCUMULATE = dict(batch_size=3, gradient_accumulation_steps=4)  # 12 sequences a step, as the default run
ACCUMULATE_CLASSIC = {"adam_mini": "adam_mini", "adalomo": "adalomo", "lomo": "sgd"}  # true accumulation of the same math


def accumulate_rows(args):
    """The default train_gpt2 run as ACCUMULATE micro-batches: each lowmem optimizer in its fused
    driver (accumulation_steps, each micro-batch used in its backward) against the classic driver
    accumulating .grad (LOMO's: SGD), at the same lr (DEFAULT_LR) and clipping (--grad_clip, else
    the default run's: the classic arm clips the sum to it, the fused arm each micro-batch to a
    k-th of it). Best val loss per seed, the arms in turn (--arms: only those named)."""
    import train_gpt2
    factors = _factors(args.factors)
    if len(factors) != 1:
        raise SystemExit(f"accumulate: --factors takes one lr multiple, got {args.factors!r}")
    rows, factor = [], factors[0]
    arms = [arm for arm in ("classic", "fused") if not args.arms or arm in args.arms.split(",")]
    for name in args.optimizers.split(","):
        if name not in ACCUMULATE_CLASSIC:
            raise SystemExit(f"accumulate: --optimizers takes {', '.join(ACCUMULATE_CLASSIC)}, got {name!r}")
        vals = {arm: [] for arm in arms}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for arm in arms:
                base = dict(ACCUMULATE, max_iters=args.iters, fused=arm == "fused", grad_clip=args.grad_clip)
                with _exact_v(args.exact_v if arm == "fused" else None):
                    h = _converge_run(train_gpt2, base, name if arm == "fused" else ACCUMULATE_CLASSIC[name],
                                      factor * train_gpt2.DEFAULT_LR[name], seed, f"{name} {arm}")
                vals[arm].append(h["best_val"])
        mean = {arm: statistics.mean(v) for arm, v in vals.items()}
        rows.append(dict(optimizer=name, **vals, **{arm + "_mean": m for arm, m in mean.items()},
                         ratio=mean["fused"] / mean["classic"] if len(mean) == 2 else None))
    return rows


@contextlib.contextmanager
def _exact_v(pattern):
    """A diagnostic of accumulate's fused Adam-mini arm (--exact_v): the parameters whose names
    match the regex `pattern` take v from the true accumulated gradient G, summed aside as its
    micro-batches arrive (a gradient's memory, what the fold exists to avoid), instead of the
    fold's estimate. Everything else runs as shipped, so a run with every tensor exact tells a
    fault of v's estimate from one of the fused driver."""
    if not pattern:
        yield
        return
    import re
    cls, aside = lowmem.AdamMini, {}
    fold, finish = cls._micro_batch, cls._finish_step

    def micro_batch(self, p, x, grad, prep, group, state, lr, first):
        if re.search(pattern, self._names[p]):
            g = lowmem._prepare_grad(grad, prep).float()
            if first:  # v before this step's decay (none before the first step)
                aside[p] = [g.clone(), state["v"].clone() if state else None]
            else:
                aside[p][0].add_(g)
        fold(self, p, x, grad, prep, group, state, lr, first)

    def finish_step(self):
        for p in [p for p in self._window if p in aside]:
            (G, v0), v, b2 = aside.pop(p), self.state[p]["v"], self._group_of[p]["betas"][1]
            v0 = torch.zeros_like(v) if v0 is None else v0
            v.copy_(lowmem.ema_(v0, lowmem.block_mean_sq(G, self._blocks[p], self._geo[p]), b2))
            self._window[p] = 1  # k = 1: adam_mini_agreement adds nothing to the exact v
        finish(self)
    cls._micro_batch, cls._finish_step = micro_batch, finish_step
    try:
        yield
    finally:
        cls._micro_batch, cls._finish_step = fold, finish


def fold_ratio_rows(args, every=10):
    """How well Adam-mini's fold of v estimates the accumulated gradient's: the default train_gpt2
    run as ACCUMULATE micro-batches, Adam-mini in the classic driver (true accumulation) for
    args.iters steps; every `every` steps each micro-batch's gradient apart, and per block the
    accumulated gradient's mean(G*G) beside three estimates (_fold_estimates). Rows: per 100
    steps, the median (and 10th, 90th percentile) over blocks of the ratio of their sums over
    those steps (what an EMA of v, ~100 steps long at beta2 = 0.99, sees), and over the run."""
    import train_gpt2
    cfg = train_gpt2.parse_config(["--optimizer='adam_mini'", "--fused=False", "--device='cpu'", f"--max_iters={args.iters}"]
                                  + [f"--{key}={value}" for key, value in dict(ACCUMULATE, grad_clip=args.grad_clip).items()])
    train_gpt2.prepare_stdlib()
    data = train_gpt2.Data(train_gpt2.STDLIB_DIR, cfg["block_size"])
    torch.manual_seed(cfg["seed"])
    model = train_gpt2.build_model(cfg, data)
    opt, k = train_gpt2.make_optimizer(model, cfg), cfg["gradient_accumulation_steps"]
    gen, rows, window, sums = torch.Generator().manual_seed(cfg["seed"]), [], {}, {}

    def row(label, sums):
        out = dict(iters=label)
        for prefix, key in (("", "sum"), ("estimate_", "fold"), ("cross_", "cross")):
            ratios = sorted((sums["true"] / sums[key]).tolist())
            out.update({prefix + "median": statistics.median(ratios), prefix + "p10": ratios[len(ratios) // 10],
                        prefix + "p90": ratios[9 * len(ratios) // 10]})
        return dict(out, blocks=len(ratios))
    for it in range(args.iters):
        for group in opt.param_groups:
            group["lr"] = train_gpt2.get_lr(it, cfg)
        micro = [data.batch("train", cfg["batch_size"], gen) for _ in range(k)]
        if it % every == 0:
            grads = []
            for x, y in micro:
                (model(x, y)[1] / k).backward()
                grads.append([p.grad for p in model.parameters()])
                model.zero_grad(set_to_none=True)
            before = [opt.state[p]["m"].clone() if opt.state.get(p) else torch.zeros_like(p) for p in model.parameters()]
        for x, y in micro:
            (model(x, y)[1] / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % every == 0:
            for key, value in _fold_estimates(opt, model, grads, before, k, it + 1).items():
                window[key] = window.get(key, 0.0) + value
                sums[key] = sums.get(key, 0.0) + value
        if (it + 1) % 100 == 0:
            rows.append(row(f"{it - 98}-{it + 1}", window))
            window = {}
            print(f"  iters {rows[-1]['iters']}: median {rows[-1]['median']:.3f}, estimate {rows[-1]['estimate_median']:.3f}",
                  file=sys.stderr, flush=True)
    rows.append(row(f"1-{args.iters}", sums))
    return rows


def _fold_estimates(opt, model, grads, m_before, k, step):
    """Per block (all tensors' blocks in a row): "true", mean(G*G) of the accumulated gradient G;
    "sum", S = the sum of the micro-batches' mean(g*g); "fold", S + (1 - 1/k)*mean(m_hat*m_hat)
    (adam_mini_agreement, m after the step); "cross", S plus twice the cross terms <g_i, g_j>
    estimated from what a fold sees: micro-batch j's dot product with m, which holds
    b1*m_old + (1-b1)*(g_1 + ... + g_{j-1}), less b1 times the first micro-batch's dot product
    with m_old for each (the same in expectation), clipped to [0, k*S]."""
    b1 = opt.param_groups[0]["betas"][0]
    out = {key: [] for key in ("true", "sum", "fold", "cross")}
    for i, (p, blocks) in enumerate(zip(model.parameters(), opt.partition)):
        whole = lowmem.Whole(p.shape)
        mean_sq = lambda x: lowmem.block_mean_sq(x, blocks, whole)
        dot = lambda a, b: (mean_sq(a + b) - mean_sq(a - b)) / 4
        g = [micro[i] for micro in grads]
        s = sum(mean_sq(x) for x in g)
        m, cross = b1 * m_before[i] + (1 - b1) * g[0], 0
        for x in g[1:]:
            cross, m = cross + dot(x, m), m + (1 - b1) * x
        cross = (cross - b1 * (k - 1) * dot(g[0], m_before[i])) / (1 - b1)
        out["true"].append(mean_sq(sum(g)))
        out["sum"].append(s)
        # the fold's own term: with beta2 = 0, adam_mini_agreement adds it to S whole
        out["fold"].append(lowmem.adam_mini_agreement(opt.state[p]["m"], s.clone(), blocks, step, (b1, 0.0), k, whole))
        out["cross"].append(torch.minimum((s + 2 * cross).clamp(min=0), k * s))
    return {key: torch.cat([x.flatten() for x in value]) for key, value in out.items()}


def _clipping(args):
    return "each optimizer's default clipping" if args.grad_clip is None else \
        "no clipping" if args.grad_clip == 0 else f"clipping at {args.grad_clip:g}"


def print_fold_ratio(rows, args):
    k = ACCUMULATE["gradient_accumulation_steps"]
    print(f"Adam-mini, train_gpt2's default run as {k} micro-batches of {ACCUMULATE['batch_size']} (classic driver, "
          f"{_clipping(args)}), "
          f"{args.iters} iters, every 10th step: per block, the sum over the steps of mean(G*G) of the accumulated "
          f"gradient over: S, the sum of the micro-batches' mean(g*g) (1: noise, {k}: agreement); S + (1 - 1/{k})*"
          f"mean(m_hat*m_hat), what Adam-mini's fold uses; the cross terms estimated from each micro-batch's dot "
          f"product with m (tried, not used)")
    print(f"{'':>18s} " + "".join(f"{label:>24s}   " for label in ("true / S", "true / fold's estimate", "true / cross terms")))
    print(f"{'iters':>10s} {'blocks':>7s} " + 3 * f"{'median':>8s} {'p10':>7s} {'p90':>7s}   ")
    for r in rows:
        print(f"{r['iters']:>10s} {r['blocks']:7d} " + "".join(
            f"{r[p + 'median']:8.3f} {r[p + 'p10']:7.3f} {r[p + 'p90']:7.3f}   " for p in ("", "estimate_", "cross_")))


def print_accumulate(rows, args):
    exact = f"; the fused arm's v exact for /{args.exact_v}/ (a diagnostic)" if args.exact_v else ""
    print(f"train_gpt2.py's default run as {ACCUMULATE['gradient_accumulation_steps']} micro-batches of "
          f"{ACCUMULATE['batch_size']}, {args.iters} iters, {_clipping(args)}, lr {args.factors}x DEFAULT_LR{exact}; "
          f"best val loss, mean of {args.seeds} seed(s)")
    print(f"{'optimizer':10s} {'classic (true sum)':>19s} {'fused, accumulating':>20s} {'fused/classic':>14s}  seeds (classic | fused)")
    for r in rows:
        mean = [f"{r[arm + '_mean']:{w}.4f}" if arm in r else f"{'-':>{w}s}" for arm, w in (("classic", 19), ("fused", 20))]
        ratio = f"{r['ratio']:13.4f}x" if r["ratio"] else f"{'-':>14s}"
        print(f"{r['optimizer']:10s} {mean[0]} {mean[1]} {ratio}  "
              + " | ".join(", ".join(f"{v:.4f}" for v in r.get(arm, [])) for arm in ("classic", "fused")))


def print_state(rows, args):
    what = "train_llama.py's offline demo (pre-training, then fine-tuning)" if args.model == "llama" else \
        f"train_gpt2.py's default run, {args.iters} iters"
    print(f"Adam-mini's first moment m on {what}; best val loss over {args.seeds} seed(s), same lr")
    print(f"{'m':22s} {'best val loss':>18s} {'vs ' + rows[0]['arm']:>10s}  seeds")
    for r in rows:
        print(f"{r['arm']:22s} {r['mean']:9.4f} +- {r['std']:.4f} {r['vs_first']:9.4f}x  " + ", ".join(f"{v:.4f}" for v in r["seeds"]))


def print_converge(results, base, args):
    n_seeds = 2 if args.quick else args.seeds
    sweep = "1x" if args.quick else ", ".join(f"{float(f):g}x" for f in args.factors.split(","))
    print(f"train_gpt2 default model{' (quick: tiny)' if args.quick else ''}, {base['max_iters']} iters, "
          f"lr sweep at seed 0 ({sweep} DEFAULT_LR), best lr at {n_seeds} seed(s); best val loss (bytes, nats)")
    print(f"{'optimizer':10s} {'best lr':>8s} {'val loss':>16s} {'vs AdamW':>9s}  sweep (lr: val)")
    for r in results:
        sweep = ", ".join(f"{float(lr):g}: {v:.4f}" for lr, v in r["sweep"].items())
        vs = f"{r['vs_adamw']:8.3f}x" if r["vs_adamw"] else f"{'':9s}"
        print(f"{r['optimizer']:10s} {r['lr']:8.3g} {r['mean']:9.4f} +- {r['std']:.4f} {vs}  {sweep}")
    print_curves(results)
    plot_curves(results, base, args.plot)


def print_curves(results):
    """The curves that plot_curves draws, as numbers: val loss by iteration at the best lr, seed 0."""
    print("val loss by iteration (best lr, seed 0):")
    print(f"{'optimizer':10s}" + "".join(f"{it:>8d}" for it, _ in results[0]["curve"]))
    for r in results:
        print(f"{r['optimizer']:10s}" + "".join(f"{v:8.4f}" for _, v in r["curve"]))


def plot_curves(results, base, path):
    """Val loss against iteration, one line per optimizer at its best lr (matplotlib: optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no {path}; pip install matplotlib to draw it)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        ax.plot(*zip(*r["curve"]), marker="o", markersize=3, label=f"{r['optimizer']} (lr {r['lr']:g}): {r['mean']:.3f}")
    ax.set_xlabel("iteration"), ax.set_ylabel("val loss (nats per byte)"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title(f"train_gpt2.py default model, {base['max_iters']} iterations, seed 1337")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout(), fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _rows_per_neuron(b):
    rows = b.shape[b.axis]
    return lowmem.Blocks(b.name, b.shape, "neuron", rows, b.axis, ((0, rows, 1),), b.decay)


def _per_element(b):
    return lowmem.Blocks(b.name, b.shape, "element", math.prod(b.shape), decay=b.decay)


def _per_tensor(b):
    return lowmem.Blocks(b.name, b.shape, "tensor", 1, decay=b.decay)


# The released adam-mini 1.1.1 matches names by substring (DESIGN.md "Adam-mini"): in this GPT, wpe,
# the fused attn.c_attn and attn.c_proj match none of its lists and get one v per tensor.
OFFICIAL_PER_TENSOR = (".wpe.weight", ".attn.c_attn.weight", ".attn.c_proj.weight")

# Adam-mini variants on the default run: (optimizer, beta2, how a tensor's blocks change)
ABLATION = {
    "Adam-mini as is": ("adam_mini", None, None),
    "official 1.1.1 partition": ("adam_mini", None, lambda b: b.name.endswith(OFFICIAL_PER_TENSOR) and _per_tensor(b)),
    "embeddings: one v per tensor": ("adam_mini", None, lambda b: b.kind == "token" and _per_tensor(b)),
    "embeddings: one v per element": ("adam_mini", None, lambda b: b.kind == "token" and _per_element(b)),
    "q/k: one v per neuron, not per head": ("adam_mini", None, lambda b: b.kind == "qkv" and _rows_per_neuron(b)),
    "norm weights: one v per element": ("adam_mini", None, lambda b: b.kind == "tensor" and len(b.shape) == 1 and
                                        _per_element(b)),
    "neuron blocks: one v per element": ("adam_mini", None, lambda b: b.kind == "neuron" and _per_element(b)),
    "beta2 0.95": ("adam_mini", 0.95, None),
    "beta2 0.999": ("adam_mini", 0.999, None),
    "AdamW (one v per element)": ("adamw", None, None),
}


def ablation_rows(args):
    """train_gpt2's default run with each ABLATION variant (--variants: those whose labels
    contain one of the comma-separated words), tuned as converge tunes an optimizer."""
    import train_gpt2
    base, make = _default_run(args.iters), train_gpt2.make_optimizer
    wanted = args.variants.split(",") if args.variants else [""]
    variants = {label: v for label, v in ABLATION.items() if any(w in label for w in wanted)}
    if not variants:
        raise SystemExit(f"ablation: no variant matches --variants={args.variants}; they are: {', '.join(ABLATION)}")

    def run(label, lr, seed):
        name, beta2, change = variants[label]

        def make_variant(model, cfg):
            opt = make(model, cfg)
            blocks = getattr(opt, "_blocks", {})  # Adam-mini's blocks of each parameter
            for p, b in blocks.items():
                blocks[p] = (change and change(b)) or b
            return opt
        train_gpt2.make_optimizer = make_variant
        try:
            return _converge_run(train_gpt2, dict(base, **({} if beta2 is None else dict(beta2=beta2))), name, lr, seed, label)
        finally:
            train_gpt2.make_optimizer = make

    results = tune({label: train_gpt2.DEFAULT_LR[v[0]] for label, v in variants.items()}, _factors(args.factors),
                   range(args.first_seed, args.first_seed + args.seeds), run)
    return [dict(variant=label, optimizer=variants[label][0], **r) for label, r in results.items()], base


def print_ablation(rows, base, args):
    print(f"train_gpt2 default model, {base['max_iters']} iters, lr sweep at seed {args.first_seed} ({args.factors} x "
          f"DEFAULT_LR), best lr at {args.seeds} seed(s) from {args.first_seed}; best val loss")
    ref = rows[0]["mean"]
    for r in rows:
        print(f"{r['variant']:38s} {r['optimizer']:10s} lr {r['lr']:<7g} {r['mean']:.4f} +- {r['std']:.4f}  "
              f"{r['mean'] / ref:.3f}x {rows[0]['variant']}")


# ---------------------------------------------------------------------------- plan: will it fit?

# Published config.json shapes (nothing is downloaded): the LOMO paper's LLaMA-1 7B/13B/65B, Llama-2-70B, GPT-2.
PLAN_MODELS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40),
    "llama-65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "llama-3.2-1b": LLAMA_3_2_1B,
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}
PLAN_ROWS = [("SGD", "sgd", False), ("AdamW", "adamw", False), ("Adam-mini classic", "adam_mini", False),
             ("Adam-mini fused", "adam_mini", True), ("Adam-mini fused, bf16 m", "adam_mini_bf16_state", True),
             ("Adam-mini fused, 8-bit m", "adam_mini_8bit_state", True), ("LOMO fused", "lomo", True),
             ("AdaLomo fused", "adalomo", True)]


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storage while ops run on the meta device: every op's
    outputs are counted once per storage, and uncounted when the storage is freed. Meta
    tensors have shapes, dtypes and lifetimes but no data, so a 70B step takes seconds.
    A DTensor (FSDP2) counts as its local shard; storages that FSDP2 resizes in place (its
    gathered parameters) are recounted through resized()."""

    def __init__(self, tensors=()):
        super().__init__()
        self.live, self.peak, self._bytes = 0, 0, {}
        for t in tensors:  # what exists before the mode: parameters, buffers
            self._count(t)

    def _count(self, t):
        storage = _local(t).untyped_storage()
        if storage._cdata not in self._bytes:
            self._bytes[storage._cdata] = 0
            weakref.finalize(storage, self._free, storage._cdata)
            self.resized(storage)

    def resized(self, storage):
        """Count `storage` at its current size (FSDP2 frees and re-allocates in place)."""
        self.live += storage.nbytes() - self._bytes[storage._cdata]
        self._bytes[storage._cdata] = storage.nbytes()
        self.peak = max(self.peak, self.live)

    def _free(self, key):
        self.live -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def _fake_ranks(world):
    """FSDP2 on the meta device as rank 0 (the fullest) of `world` ranks, in this one process:
    torch's fake process group (its testing backend: collectives return at once, move nothing),
    FSDP2's device and streams taken as meta's and the CPU's, its meta-parameter check off, and
    the storages it frees and re-allocates in place (gathered parameters) counted by LiveBytes.
    Yields a list: put the LiveBytes in it."""
    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_param as fsdp_param
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group
    import torch.distributed.fsdp._fully_shard._fully_shard as fsdp_api
    from torch.testing._internal.distributed.fake_pg import FakeStore
    counters, saved = [], (fsdp_api._get_device_from_mesh, fsdp_group.FSDPParamGroup._validate_no_meta_params,
                           fsdp_param.alloc_storage, fsdp_param.free_storage, fsdp_group.alloc_storage)

    def counted(resize):
        def change(tensor):
            resize(tensor)
            for live in counters:
                live.resized(tensor.untyped_storage())
        return change
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    fsdp_api._get_device_from_mesh = lambda mesh: torch.device("meta")
    fsdp_group.FSDPParamGroup._validate_no_meta_params = lambda self: None
    fsdp_param.alloc_storage = fsdp_group.alloc_storage = counted(saved[2])
    fsdp_param.free_storage = counted(saved[3])
    meta_handle = getattr(torch, "meta", None)
    torch.meta = torch.cpu  # FSDP2's device handle: its streams and events (no-ops on the CPU)
    try:
        yield counters
    finally:
        if meta_handle is None:
            del torch.meta
        else:
            torch.meta = meta_handle
        (fsdp_api._get_device_from_mesh, fsdp_group.FSDPParamGroup._validate_no_meta_params,
         fsdp_param.alloc_storage, fsdp_param.free_storage, fsdp_group.alloc_storage) = saved
        dist.destroy_process_group()


def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the fused (flash) kernels run it on CPU and GPU: they save q, k, v, the output and
    one logsumexp per row. On the meta device torch would pick its math path and count T x T."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]


def _eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """transformers 4.28's eager LlamaAttention, which the LOMO paper ran: the masked T x T
    scores (kept by the clamp to the dtype's minimum), their fp32 softmax and its 16-bit cast
    are saved for backward."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        scores = scores + torch.full(scores.shape[-2:], torch.finfo(q.dtype).min, device=q.device, dtype=q.dtype).triu(1)
    scores = torch.max(scores, torch.tensor(torch.finfo(q.dtype).min, device=q.device, dtype=q.dtype))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _hf_rms_norm(self, x):
    """transformers 4.28's LlamaRMSNorm: it also keeps the 16-bit input for the product."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.eps)).to(x.dtype)


@contextlib.contextmanager
def _planning(hf_eager):
    """The meta device as a kernel device: lowmem's C/CUDA kernels update in place and allocate
    nothing, so a kernel call is counted as nothing (its reference path's full-size temporaries
    would be counted otherwise). Attention saves what a fused kernel saves or, with hf_eager,
    what the LOMO paper's transformers 4.28 saved (its attention and RMSNorm). The meta device has
    no random generator, so a bf16 m on the reference path (a sharded norm weight's) is rounded to
    nearest here: its noise, a temporary the size of that small tensor, is not counted."""
    import train_llama
    saved = dict(lowmem._libs), lowmem._call, lowmem._run_multi, F.scaled_dot_product_attention, train_llama.RMSNorm.forward
    rounding, lowmem.AdamMini.m_rounding = lowmem.AdamMini.m_rounding, "nearest"
    lowmem._libs["meta"] = "kernels: in place, no allocation"
    lowmem._call = lowmem._run_multi = lambda *args: None
    F.scaled_dot_product_attention = _eager_attention if hf_eager else _flash_attention
    if hf_eager:
        train_llama.RMSNorm.forward = _hf_rms_norm
    try:
        yield
    finally:
        lowmem._libs.clear(), lowmem._libs.update(saved[0])
        lowmem.AdamMini.m_rounding = rounding
        lowmem._call, lowmem._run_multi, F.scaled_dot_product_attention, train_llama.RMSNorm.forward = saved[1:]


def plan_peak(config, optimizer, fused, batch, seq, dtype, checkpointing=False, hf_eager=False,
              master_weights=False, world=1):
    """Peak bytes of two training steps on the meta device (the second one has the optimizer's
    state), and the parts: parameters, gradients, optimizer state. The optimizer is the training
    scripts' own (bench.make_opt): its state is what its own code allocates. world > 1: one
    rank's figures with the model sharded by FSDP2 as the scripts' --fsdp=True shards it (every
    block and the root), `batch` sequences on this rank."""
    import train_gpt2
    with contextlib.ExitStack() as stack:
        counters = stack.enter_context(_fake_ranks(world)) if world > 1 else []
        with torch.device("meta"):
            model = make_model(dict(config, activation_checkpointing=checkpointing)).to(dtype)
        if world > 1:
            train_gpt2.shard_model(model)
        tensors = [_local(t) for t in (*model.parameters(), *model.buffers())]
        sizes = [t.numel() * t.element_size() for t in tensors[:len(list(model.parameters()))]]
        batch_fn = batch_fn_for(model, batch, seq, "meta")
        with _planning(hf_eager), LiveBytes(tensors) as live:
            counters.append(live)
            opt = make_opt(optimizer, model, fused=fused)
            master = MasterWeights(model, opt) if master_weights else None
            if opt is None:
                _free_grads_on_arrival(model)
            for _ in range(2):
                train_step(model, master or opt, batch_fn, fused)
            parts = _accounting(sizes, opt, fused)
    parts["state"] += master.bytes() if master else 0
    return dict(parts, peak=live.peak)


def plan_rows(config, args):
    """Every PLAN_ROWS optimizer at args.batch x args.seq, and the largest batch that fits
    args.device_memory. Peak memory grows linearly with the batch (activations), at most as
    fast as the no-optimizer run's peak does, so the largest batch uses that slope: a bound
    that a classic driver, whose peak may come at step() instead, can only beat."""
    dtype, memories = getattr(torch, args.dtype), [parse_bytes(m) for m in str(args.device_memory).split(",")]
    run = functools.partial(plan_peak, config, seq=args.seq, dtype=dtype, checkpointing=args.activation_checkpointing,
                            hf_eager=args.hf_eager, world=args.world)
    act = [run("none", True, batch=b) for b in (args.batch, 2 * args.batch)]
    per_example = (act[1]["peak"] - act[0]["peak"]) / args.batch
    activations = act[0]["peak"] - act[0]["params"] - act[0]["grads"]
    rows = []
    for label, name, fused in PLAN_ROWS:
        master = args.master_weights and name in ("adamw", "sgd")
        r = run(name, fused, batch=args.batch, master_weights=master)
        r.update(name=label + (" +fp32 master" if master else ""), activations=activations,
                 accounted=r["params"] + r["grads"] + r["state"] + activations,
                 max_batch=[max(0, args.batch + math.floor((mem - r["peak"]) / per_example)) for mem in memories])
        rows.append(r)
    return rows


def parse_bytes(text):
    """'24GB', '80GiB', '16e9' -> bytes (GB is 10**9, GiB 2**30, as device specs and nvidia-smi use them)."""
    units = {"tib": 2 ** 40, "gib": 2 ** 30, "mib": 2 ** 20, "tb": 1e12, "gb": 1e9, "mb": 1e6, "b": 1}
    t = str(text).strip().lower()
    unit = next((u for u in units if t.endswith(u)), "b")
    try:
        return int(float(t[:len(t) - len(unit)] if t.endswith(unit) else t) * units[unit])
    except ValueError:
        raise SystemExit(f"device_memory: {text!r} is not a size like 24GB or 80GiB") from None


LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def plan_config(source):
    """A PLAN_MODELS name or a config.json path (a Hugging Face model directory works too),
    checked to describe a model the plan can build (train_gpt2's GPT or train_llama's Llama)."""
    if source in PLAN_MODELS:
        return PLAN_MODELS[source]
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise SystemExit(f"plan: {source!r} is neither a config.json nor one of {', '.join(PLAN_MODELS)}")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"plan: {path} is not JSON ({e})") from None
    if "block_size" in config or config.get("model_type") == "gpt2":
        return config
    missing = [k for k in LLAMA_KEYS if k not in config]
    if missing or config.get("model_type", "llama") not in ("llama", "mistral"):
        raise SystemExit(f"plan: {path} is not a LLaMA or GPT-2 config (model_type "
                         f"{config.get('model_type')!r}{', missing ' + ', '.join(missing) if missing else ''})")
    return config


def print_plan(rows, args):
    unit, scale = ("GiB", 2 ** 30) if max(r["peak"] for r in rows) >= 2 ** 30 else ("MiB", 2 ** 20)
    size = lambda b: f"{b / scale:8.2f}"  # noqa: E731
    n = rows[0]["params"] / torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    devices = str(args.device_memory).split(",")
    world = args.world
    ranks = f" (per rank of {world}: FSDP2 shards, rank 0, the fullest)" if world > 1 else ""
    print(f"{args.model}: {n * world / 1e6:,.1f}M parameters{ranks}, {args.dtype}, batch {args.batch} x {args.seq}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}"
          f"{', transformers 4.28 eager attention + RMSNorm' if args.hf_eager else ''}; {unit}")
    print(f"{'optimizer':31s} {'params':>8s} {'grads':>8s} {'state':>8s} {'activ.':>8s} {'sum':>8s} {'peak':>8s}  "
          + " ".join(f"{'max batch ' + d:>16s}" for d in devices))
    for r in rows:
        print(f"{r['name']:31s} {size(r['params'])} {size(r['grads'])} {size(r['state'])} {size(r['activations'])}"
              f" {size(r['accounted'])} {size(r['peak'])}  " + " ".join(f"{b:16d}" for b in r["max_batch"]))
    print("sum = params + grads + state + activations (the papers' accounting); peak = live bytes at the worst moment"
          " of two training steps run on the meta device (nothing allocated); max batch: the most sequences of this"
          " length per step on a device of that size (0: not even one).")


class MasterWeights:
    """Mixed-precision training as the LOMO paper's AdamW and SGD ran it (apex/DeepSpeed fp16):
    the optimizer steps an fp32 copy of each 16-bit parameter, which is copied back."""

    def __init__(self, model, opt):
        self.params = list(model.parameters())
        self.copies = [p.detach().float() for p in self.params]
        opt.param_groups.clear(), opt.add_param_group(dict(params=self.copies))
        self.opt = opt

    def step(self):
        for p, c in zip(self.params, self.copies):  # one tensor at a time: one fp32 gradient at most
            c.grad, p.grad = p.grad.float(), None
            self.opt.step()  # torch's optimizers skip parameters without a gradient
            c.grad = None
            p.detach().copy_(c)

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none)

    def bytes(self):
        return sum(c.numel() * c.element_size() for c in self.copies)


# ---------------------------------------------------------------------------- gpu: one command for a GPU machine

GPU_RUNS = [("adamw", False), ("adam_mini", False), ("adam_mini", True), ("adalomo", True), ("lomo", True)]
GPU_MEMORY_ROWS = ("no optimizer (grads freed)", "AdamW", "Adam-mini classic", "Adam-mini fused", "Adam-mini fused, 8-bit m",
                   "LOMO fused", "AdaLomo fused")


def gpu_report(args):
    """python bench.py gpu: the CUDA tests, the kernel tables (fp32, bf16), GPT-2 124M with each
    optimizer with and without compile, and the Llama-3.2-1B shape's memory per optimizer, in one
    markdown report (args.report). Sized for < 9 minutes on one H100. --quick --device=cpu runs a
    tiny version of every stage (the tests do, so the command's own code is tested without a GPU)."""
    if args.device != "cuda" and not args.quick:
        raise SystemExit("bench.py gpu: needs a CUDA GPU (torch.cuda.is_available() is False here)")
    start, sections, failed = time.time(), [], False
    for title, stage in (("Kernel self-check", _gpu_self_check), ("CUDA tests", _gpu_tests), ("Update kernels", _gpu_kernels),
                         ("GPT-2 124M training", _gpu_gpt2), ("Llama-3.2-1B shape, bf16 fine-tuning", _gpu_llama)):
        t0 = time.time()
        print(f"bench.py gpu: {title} ...", file=sys.stderr)
        try:
            text, ok = stage(args)
        except Exception as e:  # a stage that breaks is reported; the later stages still run
            text, ok = f"FAILED: {type(e).__name__}: {e}", False
        failed |= not ok
        sections.append(f"## {title} ({time.time() - t0:.0f} s)\n\n{text}\n")
    head = (f"# bench.py gpu report\n\n{_device_name(args.device)}, torch {torch.__version__}, lowmem "
            f"{_git_commit()}, {time.time() - start:.0f} s in all{' (--quick)' if args.quick else ''}\n")
    with open(args.report, "w") as f:
        f.write("\n".join([head, *sections]))
    print(open(args.report).read())
    return 1 if failed else 0


def _device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else f"{device} ({torch.get_num_threads()} threads)"


def _git_commit():
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return run.stdout.strip() or "(not a git checkout)"


def _gpu_self_check(args):
    """The self-check a CUDA build passes before lowmem uses it (lowmem.py, section 5): its verdict
    on this GPU, the first check's time (a child process runs it) and what a later process pays
    (the cached verdict read). --quick on the CPU: the CPU build checks itself, as a stand-in."""
    device = torch.device(args.device)
    path, why = lowmem._compile(cuda=device.type == "cuda")
    reference = lowmem._compile(cuda=False)[0]
    if path is None:
        return f"no {device.type} build: {why}", False
    with tempfile.TemporaryDirectory() as fresh:  # a copy of the build, with no verdict cached yet
        build = shutil.copy(path, fresh)
        t0 = time.perf_counter()
        verdict = lowmem._verdict(build, device, reference)
        first, later = time.perf_counter() - t0, []
        for _ in range(20):
            t0 = time.perf_counter()
            lowmem._verdict(build, device, reference)
            later.append(time.perf_counter() - t0)
    return (f"verdict: {verdict or 'passed'}\n\nfirst check (in a child process): {first:.2f} s; with the verdict "
            f"cached, as every later process finds it: {statistics.median(later) * 1e3:.2f} ms (median of 20)"), verdict is None


def _gpu_tests(args):
    select = "kernel_argument_checks" if args.quick else "cuda"  # every test run on the cuda device, nvcc's build
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", select, "test_lowmem.py"], capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = run.stdout.strip().splitlines()
    return "```\n" + "\n".join(lines[-25:] if run.returncode else lines[-1:]) + "\n```", run.returncode == 0


def _gpu_kernels(args):
    params, repeats = (2e5, 2) if args.quick else (args.params, 20)
    tables = []
    for dtype in ("float32", "bfloat16"):
        rows, n = kernel_rows(int(params), getattr(torch, dtype), args.device, repeats)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_kernels(rows, n, argparse.Namespace(dtype=dtype, device=args.device, repeats=repeats))
        tables.append(f"```\n{out.getvalue()}```")
    return "\n".join(tables), True


def _gpu_gpt2(args):
    """Each optimizer, eager and compiled, in a fresh process (clean peak-memory statistics)."""
    data = _gpt2_vocab_data()
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "gpt2_124m.py")
    size = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2"] if args.quick else []
    iters = 4 if args.quick else 30
    lines = ["| optimizer | driver | compile | ms/iter | tokens/s | peak MiB (max_memory_allocated) | loss |",
             "|---|---|---|---|---|---|---|"]
    ok = True
    for compiled in ((False,) if args.quick else (False, True)):
        for name, fused in (GPU_RUNS[::3] if args.quick else GPU_RUNS):
            argv = [config, f"--dataset={data!r}", f"--optimizer={name!r}", f"--fused={fused}", f"--compile={compiled}",
                    f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=1", f"--log_interval={iters // 3}",
                    "--sample_tokens=0", "--gradient_accumulation_steps=1", "--overwrite=True", f"--device={args.device!r}",
                    f"--out_dir={os.path.join(data, 'out')!r}", *size] + (["--amp=False"] if args.quick else [])
            probe = ("import json, sys, train_gpt2; cfg = train_gpt2.parse_config(sys.argv[1:]); h = train_gpt2.train(cfg); "
                     "print(json.dumps(dict(ms=h['ms_per_iter'], peak=h['peak_mb'], loss=h['train'][-1][1], "
                     "tokens=cfg['batch_size'] * cfg['block_size'])))")
            run = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            if run.returncode:
                ok = False
                lines.append(f"| {name} | {'fused' if fused else 'classic'} | {compiled} | FAILED: "
                             f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode} | | | |")
                continue
            h = json.loads(run.stdout.strip().splitlines()[-1])
            ms = statistics.median(h["ms"][1:] or h["ms"])  # the first interval holds compilation
            lines.append(f"| {name} | {'fused' if fused else 'classic'} | {compiled} | {ms:.1f} | {h['tokens'] / ms * 1e3:,.0f} "
                         f"| {h['peak']:,.0f} | {h['loss']:.3f} |")
    return "\n".join(lines), ok


def _gpt2_vocab_data():
    """nanoGPT-format data with GPT-2's vocabulary size, made offline from the stdlib bytes."""
    import train_gpt2
    src, out = train_gpt2.prepare_stdlib(), os.path.join(tempfile.gettempdir(), "lowmem-gpu-data")
    os.makedirs(out, exist_ok=True)
    for split in ("train", "val"):
        shutil.copy(os.path.join(src, f"{split}.bin"), out)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"vocab_size": 50304, "tokenizer": "ids"}, f)
    return out


def _gpu_llama(args):
    ns = argparse.Namespace(model="llama", device=args.device, dtype="bfloat16", quick=args.quick, world=1)
    names = GPU_MEMORY_ROWS[:2] if args.quick else GPU_MEMORY_ROWS
    rows, size = memory_rows(ns, size="quick" if args.quick else "1b", names=names)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_memory(rows, ns, size)
    adamw = next(r for r in rows if r["name"] == "AdamW")
    times = "\n".join(f"{r['name']:28s} {r['ms']:8.1f} ms/step  {r['total'] / 2 ** 30:6.2f} GiB  "
                      f"{r['total'] / adamw['total']:.2f}x AdamW" for r in rows)
    return f"```\n{out.getvalue()}```\n```\n{times}\n```", True


def _bool(text):
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() in ("true", "1")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "_memory_row":  # the fresh process of one memory row
        row = memory_row(json.loads(sys.argv[2]))
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 prints for all
            print(json.dumps(row))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import train_gpt2
            train_gpt2.end_rank()
        return
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    ap.add_argument("command", choices=["memory", "speed", "converge", "state", "accumulate", "ablation", "kernels", "gpu",
                                        "plan"],
                    help="which table to measure (gpu: every GPU check in one report; plan: will it fit)")
    ap.add_argument("config", nargs="?", default="llama-7b",
                    help=f"plan: a config.json (GPT-2 or LLaMA) or one of {', '.join(PLAN_MODELS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--model", default="gpt", choices=["gpt", "llama"], help="memory: train_gpt2's or train_llama's model")
    ap.add_argument("--size", default=None, choices=["full", "activations", "plan"],
                    help="memory: which model (SIZES; default full, quick with --quick, gpu on cuda)")
    ap.add_argument("--params", type=float, default=50e6, help="kernels: parameters in the tensor set")
    ap.add_argument("--repeats", type=int, default=7, help="kernels: timed steps (the median is shown)")
    ap.add_argument("--shape", default="square", choices=list(KERNEL_SHAPES), help="kernels: which tensor set")
    ap.add_argument("--world", type=int, default=1,
                    help="memory, plan: ranks, the model sharded with FSDP2 (memory: under torchrun); per-rank figures")
    ap.add_argument("--iters", type=int, default=1500, help="converge: iterations per run (the default run's length)")
    ap.add_argument("--factors", default=None,
                    help="converge, ablation: the lr sweep, as multiples of DEFAULT_LR (default 0.5,1,2; ablation 1); accumulate: one")
    ap.add_argument("--variants", default="", help="ablation: only the variants whose labels contain one of these words")
    ap.add_argument("--first_seed", type=int, default=0,
                    help="ablation, state, accumulate: seeds first_seed .. first_seed+seeds-1 (the lr sweep at the first): runs can be split")
    ap.add_argument("--seeds", type=int, default=3, help="converge, ablation, state, accumulate: seeds (converge: at the best lr)")
    ap.add_argument("--optimizers", default=None,
                    help="converge: which (sgd = lomo's math; default adamw,adam_mini,adalomo,lomo); accumulate: "
                         "lowmem's (default adam_mini,adalomo,lomo)")
    ap.add_argument("--grad_clip", type=float, default=None,
                    help="accumulate: clipping by global norm in both arms (default: the default run's, train_gpt2's "
                         "DEFAULT_CLIP; 0: none)")
    ap.add_argument("--exact_v", default=None,
                    help="accumulate: a diagnostic; the fused Adam-mini arm takes v from the true accumulated gradient "
                         "(kept aside) for the parameters whose names match this regex ('.': all)")
    ap.add_argument("--ratio", action="store_true",
                    help="accumulate: how well Adam-mini's fold estimates v (the accumulated gradient's over estimates, per block)")
    ap.add_argument("--drift", action="store_true", help="state: how far a bf16 or 8-bit m drifts from the exact m over a run")
    ap.add_argument("--arms", default="", help="state: only the arms whose labels contain one of these words (comma-separated); "
                                               "accumulate: classic, fused or both")
    ap.add_argument("--plot", default="assets/loss_curves.png", help="converge: where the loss curves go (matplotlib)")
    ap.add_argument("--batch", type=int, default=8, help="plan: sequences per step")
    ap.add_argument("--seq", type=int, default=512, help="plan: tokens per sequence")
    ap.add_argument("--activation_checkpointing", type=_bool, default=False, help="plan: recompute each layer in backward")
    ap.add_argument("--device_memory", default="24GB,40GB,80GB", help="plan: device sizes for the max batch (24GB, 80GiB)")
    ap.add_argument("--hf_eager", type=_bool, default=False,
                    help="plan: count transformers 4.28's eager attention and RMSNorm (the LOMO paper's runs)")
    ap.add_argument("--master_weights", type=_bool, default=False,
                    help="plan: AdamW/SGD step an fp32 copy of 16-bit weights (the LOMO paper's mixed precision)")
    ap.add_argument("--quick", action="store_true", help="a reduced run of about a minute")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--report", default="gpu_report.md", help="gpu: where the markdown report is written")
    args = ap.parse_args()
    args.factors = args.factors or ("1" if args.command in ("ablation", "accumulate") else "0.5,1,2")
    args.optimizers = args.optimizers or ("adam_mini,adalomo,lomo" if args.command == "accumulate" else "adamw,adam_mini,adalomo,lomo")
    if args.command == "gpu":
        sys.exit(gpu_report(args))
    if args.command == "plan":
        if args.batch < 1 or args.seq < 1:
            raise SystemExit(f"plan: --batch and --seq must be at least 1, got {args.batch} and {args.seq}")
        config = plan_config(args.config)
        args.model = args.config
        rows = plan_rows(config, args)
        print(json.dumps(rows, indent=1)) if args.json else print_plan(rows, args)
        return
    if args.command == "memory":
        rows, size = memory_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_memory(rows, args, size)
    elif args.command == "speed":
        rows, size, n_tensors = speed_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_speed(rows, args, size, n_tensors)
    elif args.command == "ablation":
        rows, base = ablation_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_ablation(rows, base, args)
    elif args.command == "state" and args.drift:
        rows = m_drift_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_m_drift(rows, args)
    elif args.command == "accumulate" and args.ratio:
        rows = fold_ratio_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_fold_ratio(rows, args)
    elif args.command == "accumulate":
        rows = accumulate_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_accumulate(rows, args)
    elif args.command == "state":
        rows = state_rows(args)
        print(json.dumps(rows, indent=1)) if args.json else print_state(rows, args)
    elif args.command == "converge":
        results, base = converge_rows(args)
        print(json.dumps(results, indent=1)) if args.json else print_converge(results, base, args)
    else:
        rows, n = kernel_rows(int(args.params), getattr(torch, args.dtype), args.device, args.repeats, args.shape)
        if args.json:
            print(json.dumps(dict(device=args.device, dtype=args.dtype, params=n, rows=rows), indent=1))
        else:
            print_kernels(rows, n, args)


if __name__ == "__main__":
    main()
