"""Pre-train GPT-2 with AdamW, Adam-mini, AdaLomo, LOMO or SGD (nanoGPT's model.py + train.py).

    python train_gpt2.py                                  # CPU smoke run, offline, a few minutes
    python train_gpt2.py --optimizer=adalomo              # any optimizer; fused drivers for lomo/adalomo
    python train_gpt2.py config/gpt2_124m.py              # GPT-2 124M on nanoGPT's openwebtext (GPU)
    torchrun --nproc_per_node=8 train_gpt2.py config/gpt2_124m.py

Config is the plain globals below; a config file (Python assignments) and --key=value
arguments override them, in order. The default data is text that ships with Python (the
stdlib's documentation topics and docstrings) as bytes, so nothing is ever downloaded.
`GPT`, `GPTConfig` and `Data` import without side effects (tests and bench.py use them).

The file in order: the config globals; the training loop (`train`, then `Trainer`, whose
`step` is one optimizer step with either lowmem driver, shared with train_llama.py); the GPT-2
model; Hugging Face checkpoints; the data; config parsing; the training helpers.
"""
import ast
import glob
import importlib
import json
import math
import os
import resource
import shutil
import sys
import sysconfig
import time
import zipfile
import zlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import lowmem

# ----------------------------------------------------------------------------------------
# config: plain globals, overridden by a config file and --key=value (see parse_config)
out_dir = None  # None: out-gpt2-{optimizer}, so runs with different optimizers keep their checkpoints
init_from = "scratch"  # scratch | resume | a Hugging Face GPT-2 directory (config.json + weights)
overwrite = False  # let a new run replace a checkpoint that another configuration wrote to out_dir
dataset = "stdlib"  # stdlib (built offline from Python's own docs) | a dir with nanoGPT train.bin/val.bin
eval_interval = 250  # iterations between val-loss evaluations (each also saves out_dir/ckpt.pt)
eval_iters = 20  # val batches per evaluation (the same batches every time)
log_interval = 25  # iterations between progress lines
sample_tokens = 200  # tokens sampled from the model at the end (0: none)
temperature = 0.8  # sampling temperature (0: greedy, which repeats itself on a model this small)
top_k = 200  # sample among the k most likely tokens (nanoGPT's sample.py defaults)
# model
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # model width
block_size = 128  # context length in tokens
dropout = 0.0  # 0 for pre-training, as nanoGPT; try 0.1 when fine-tuning
bias = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
activation_checkpointing = False  # recompute each block in backward: less activation memory, more compute
# optimizer
optimizer = "adamw"  # adamw | adam_mini | adalomo | lomo | sgd
fused = None  # update inside backward (lowmem only); None: True for lomo/adalomo, else False
learning_rate = None  # None: DEFAULT_LR[optimizer] (adamw 5e-3, adam_mini 4e-3, adalomo 0.05, lomo 0.4, sgd 0.4)
weight_decay = None  # None: DEFAULT_WD[optimizer] (0.1 for adamw, adam_mini; 0 for the others)
beta1 = 0.9  # adamw, adam_mini
beta2 = 0.99  # adamw, adam_mini (0.99: a small model with few tokens per step, as nanoGPT's char runs)
adam_mini_state = "float32"  # adam_mini's first moment m: float32 | bfloat16 | int8 (8 bits: 1 byte a parameter)
grad_clip = None  # global norm, 0 = off; None: DEFAULT_CLIP[optimizer] (1.0; 0 for adalomo) (fused accumulating: each micro-batch to 1/k)
stochastic_rounding = True  # bf16 parameters, lowmem optimizers
batch_size = 12  # sequences per micro-batch
gradient_accumulation_steps = 1  # micro-batches per step (fused: each one's gradient is used in its backward)
max_iters = 1500  # optimizer steps
warmup_iters = 100  # linear lr warmup, then cosine decay
lr_decay_iters = None  # None: max_iters
min_lr = None  # None: learning_rate / 10
# system
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "float32"  # parameter dtype: float32 | bfloat16 | float16 (fp16 needs a fused driver)
amp = False  # bf16 autocast of forward/backward with fp32 parameters (CUDA; nanoGPT's default)
compile = False  # torch.compile the model (needs a C++ compiler on the CPU; slow to start)
fsdp = False  # under torchrun: FSDP2 shards parameters, gradients, optimizer state (each block, the root); resumes on any number of ranks
seed = 1337  # model init, data order and the sample
# ----------------------------------------------------------------------------------------

# Tuned on the default run (1500 iterations, best val loss; RESULTS.md "Convergence: `python bench.py converge`"): AdaLomo lr
# 0.01 / 0.03 / 0.05 / 0.1 -> 2.41 / 1.84 / 1.77 / 2.09; LOMO/SGD 0.1 / 0.2 / 0.4 / 0.8 / 1.6 ->
# 2.619 / 2.589 / 2.575 / 2.568 / 2.595 (0.4, not 0.8: 0.3% apart at the end, 0.4 ahead until
# iteration 1000 and one doubling further from where larger lrs get worse).
DEFAULT_LR = {"adamw": 5e-3, "adam_mini": 4e-3, "adalomo": 0.05, "lomo": 0.4, "sgd": 0.4}
# Decoupled decay as AdamW's p *= 1 - lr*wd: with SGD-scale lrs (0.4) the same 0.1 would shrink
# every weight by 4% a step, so LOMO/AdaLomo/SGD default to none, as in the LOMO/AdaLomo papers.
DEFAULT_WD = {"adamw": 0.1, "adam_mini": 0.1, "adalomo": 0.0, "lomo": 0.0, "sgd": 0.0}
# Global-norm clipping in a fused driver costs a second backward (LOMO paper 3.3). AdaLomo's
# grouped update normalization replaces it (AdaLomo paper 3.2; its official code clips nothing).
DEFAULT_CLIP = {"adamw": 1.0, "adam_mini": 1.0, "adalomo": 0.0, "lomo": 1.0, "sgd": 1.0}
OPTIMIZERS = tuple(DEFAULT_LR)
OPTIONAL = {"out_dir": str, "fused": bool, "learning_rate": float, "lr_decay_iters": int, "min_lr": float, "weight_decay": float,
            "grad_clip": float}
CONFIG_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
               and (isinstance(v, (int, float, bool, str)) or k in OPTIONAL)]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}


# ----------------------------------------------------------------------------------------
# the training loop: train() builds one run; Trainer.step() is one optimizer step, fused
# (opt.fused_backward) or classic (micro-batches, backward, clip, opt.step); Trainer.run() the
# schedule, logging and evaluation. Everything it calls is defined further down.


def train(cfg):
    """One GPT-2 training job; returns the Trainer's history."""
    dev, rank, world = setup_device(cfg["device"], cfg["fsdp"])
    if cfg["dataset"] == "stdlib" and rank == 0:
        prepare_stdlib()  # once, cached under data/stdlib
    if world > 1:
        dist.barrier()
    data = Data(STDLIB_DIR if cfg["dataset"] == "stdlib" else cfg["dataset"], cfg["block_size"])
    torch.manual_seed(cfg["seed"])  # same init on every rank
    ckpt = load_checkpoint(cfg, ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset")) \
        if cfg["init_from"] == "resume" else None
    model = build_model(cfg, data)
    trainer = Trainer(model, cfg, dev, rank, world, ckpt)
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"] * world
    trainer.log(f"{model.num_params() / 1e6:.2f}M parameters | {cfg['optimizer']} "
                f"({'fused' if cfg['fused'] else 'classic'}) lr {cfg['learning_rate']:g} | {cfg['dtype']} on {dev}"
                f"{f' x{world}' if world > 1 else ''} | vocab {data.vocab_size} | {tokens_per_iter:,} tokens/iter")

    def evaluate():  # the same eval_iters val batches every time
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        return estimate_loss(model, lambda: data.batch("val", cfg["batch_size"], gen, dev), cfg["eval_iters"])

    history = trainer.run(lambda: data.batch("train", cfg["batch_size"], trainer.data_gen, dev, (rank, world)), evaluate,
                          tokens_per_iter)
    if cfg["sample_tokens"] and (rank == 0 or cfg["fsdp"]):  # FSDP2's forward needs every rank
        prompt = data.batch("val", 1, torch.Generator().manual_seed(0), dev)[0][:, :32]
        out = model.eval().generate(prompt, cfg["sample_tokens"], cfg["temperature"], cfg["top_k"],
                                    torch.Generator().manual_seed(cfg["seed"]))[0].tolist()
        trainer.log(f"sample (temperature {cfg['temperature']:g}, top_k {cfg['top_k']}; prompt: 32 val tokens):"
                    f"\n{data.decode(out)}\n")
    trainer.log(f"done: {cfg['max_iters']} iters | best val loss {history['best_val']:.4f} | peak memory "
                f"{history['peak_mb']:,.0f} MB | optimizer state {history['state_bytes'] / 2 ** 20:.2f} MB")
    leave_process_group(world)
    return history


def build_model(cfg, data):
    if cfg["init_from"] in ("scratch", "resume"):
        return GPT(GPTConfig(cfg["block_size"], data.vocab_size, cfg["n_layer"], cfg["n_head"], cfg["n_embd"],
                             cfg["dropout"], cfg["bias"], cfg["activation_checkpointing"]))
    model = GPT.from_pretrained(cfg["init_from"], dropout=cfg["dropout"],
                                activation_checkpointing=cfg["activation_checkpointing"])
    if data.vocab_size > model.config.vocab_size or cfg["block_size"] > model.config.block_size:
        raise SystemExit(f"init_from={cfg['init_from']}: the model (vocab {model.config.vocab_size}, context "
                         f"{model.config.block_size}) is smaller than the data (vocab {data.vocab_size}) or block_size")
    return model


class Trainer:
    """The training loop of both scripts: model(x, y) -> (logits, loss); `next_batch()` gives
    (x, y) on the device; `evaluate()` the val loss. Knows the fused and classic drivers,
    DDP, accumulation, the lr schedule, logging and checkpoints. `run()` returns a history."""

    def __init__(self, model, cfg, dev, rank=0, world=1, ckpt=None, seed_offset=0):
        self.model, self.cfg, self.dev, self.rank, self.world = model, cfg, dev, rank, world
        if not lowmem._is_fsdp_module(model):  # not sharded already (train_llama's pre-training does it)
            model.to(device=dev, dtype=getattr(torch, cfg["dtype"]))
            if cfg["fsdp"]:
                shard_model(model)
        self.opt = make_optimizer(model, cfg)  # after sharding: it sees this rank's rows
        self.data_gen = torch.Generator().manual_seed(cfg["seed"] + 1000 + seed_offset)  # the same on every rank
        self.start, self.best_val = 0, float("inf")
        if ckpt and cfg["fsdp"]:
            load_sharded(model, self.opt, ckpt["sharded"])  # the rows this rank holds, from any number of ranks
        elif ckpt:
            model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
        if ckpt:
            self.data_gen.set_state(ckpt["data_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.start, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        # Fused drivers are never DDP-wrapped: lowmem averages each gradient in its hook (DESIGN.md "Updates inside backward").
        self.ddp = world > 1 and not cfg["fused"] and not cfg["fsdp"]
        self.train_model = nn.parallel.DistributedDataParallel(model) if self.ddp else model
        if cfg["compile"]:
            self.train_model = torch.compile(self.train_model)
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg["amp"] else nullcontext()
        self.log = print if rank == 0 else (lambda *a, **k: None)
        check_out_dir(cfg)  # on every rank, so that all of them stop
        if rank == 0:
            os.makedirs(cfg["out_dir"], exist_ok=True)

    def step(self, next_batch):
        """One optimizer step; returns the last micro-batch loss (a tensor) and whether it was applied."""
        accum = self.cfg["gradient_accumulation_steps"]
        if self.cfg["fused"]:  # the optimizer knows accum: its last fused_backward ends the step
            for micro in range(accum):
                with self.autocast:
                    loss = self.train_model(*next_batch())[1]
                applied = self.opt.fused_backward(loss / accum if accum > 1 else loss)
            return loss, applied
        for micro in range(accum):
            sync = self.train_model.no_sync() if self.ddp and micro < accum - 1 else nullcontext()
            with sync, self.autocast:
                loss = self.train_model(*next_batch())[1]
                (loss / accum).backward()
        if self.cfg["grad_clip"] and not hasattr(self.opt, "fused_backward"):  # lowmem clips in step()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, True

    def run(self, next_batch, evaluate, tokens_per_iter):
        cfg, history = self.cfg, {"train": [], "val": [], "skipped": 0, "ms_per_iter": []}
        it, t0, timed = self.start, time.time(), 0
        while True:
            if it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]:
                self._evaluate(it, evaluate, history)
                t0, timed = time.time(), 0
            if it >= cfg["max_iters"]:
                break
            lr = get_lr(it, cfg)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss, applied = self.step(next_batch)
            history["skipped"] += not applied
            it, timed = it + 1, timed + 1
            if it % cfg["log_interval"] == 0 or it == cfg["max_iters"]:
                history["train"].append((it, loss.item()))  # the only per-interval host sync
                dt = (time.time() - t0) / timed
                history["ms_per_iter"].append(dt * 1000)
                self.log(f"iter {it} | loss {history['train'][-1][1]:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | "
                         f"{tokens_per_iter / dt:,.0f} tok/s | peak {peak_memory_mb(self.dev):,.0f} MB | "
                         f"opt state {state_bytes(self.opt) / 2 ** 20:.2f} MB" + (" | skipped (fp16 overflow)" if not applied else ""))
                t0, timed = time.time(), 0
        history.update(best_val=self.best_val, peak_mb=peak_memory_mb(self.dev), state_bytes=state_bytes(self.opt))
        return history

    def _evaluate(self, it, evaluate, history):
        if self.rank != 0 and not self.cfg["fsdp"]:  # FSDP2's forward needs every rank
            return
        val = evaluate()
        self.best_val = min(self.best_val, val)
        history["val"].append((it, val))
        self.log(f"iter {it}: val loss {val:.4f} (best {self.best_val:.4f})")
        if it > self.start:
            save_checkpoint(self.cfg, self.model, self.opt, it, self.best_val, self.data_gen)


@torch.no_grad()
def estimate_loss(model, batches, n):
    """Mean loss over n batches from `batches()`, in eval mode."""
    model.eval()
    losses = [model(*batches())[1].item() for _ in range(n)]
    model.train()
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------------------
# model (GPT-2: learned positions, pre-LayerNorm, tanh-GELU MLP, tied wte/lm_head)

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    activation_checkpointing: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q|k|v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.n_head = config.n_head  # read by lowmem.partition to split c_attn into heads
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, one update
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 paper: scaled residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.config.activation_checkpointing and self.training:
                # use_reentrant=False: the reentrant variant can fire a tied weight's
                # post-accumulate hook twice with partial gradients (DESIGN.md "Updates inside backward")
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face GPT-2 directory from disk (config.json + weights, see hf_tensors).
        HF's Conv1D stores weights as (in, out): they are transposed."""
        with open(hf_file(path, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, **overrides)
        model = cls(config)

        def convert(key, tensor):
            key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                return None  # causal-mask buffers, not parameters
            if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                tensor = tensor.t()
            return key, tensor
        load_hf_weights(path, model.state_dict(), "GPT-2", convert, tied={"lm_head.weight"})
        return model

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens tokens (nanoGPT's sample.py): logits / temperature, keep the top_k,
        draw with `generator` (seeded: the same sample every run). temperature=0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[0][:, -1].float()
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


# ----------------------------------------------------------------------------------------
# Hugging Face checkpoint directories (read here and by train_llama.py)

def hf_file(path, name):
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        raise MissingInput(f"{path}: {name} not found (expected a Hugging Face checkpoint directory)")
    return full


def hf_tensors(path):
    """Yield (name, tensor) over every weight file of a HF directory (model.safetensors, sharded
    safetensors with its index, or pytorch_model*.bin), one file mapped at a time."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, single)):
            files = [single]
        else:
            continue
        for name in files:
            full = hf_file(path, name)
            if name.endswith(".safetensors"):
                from safetensors import safe_open  # optional dependency: only for safetensors files
                with safe_open(full, framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
            else:
                yield from torch.load(full, map_location="cpu", weights_only=True, mmap=True).items()
        return
    raise MissingInput(f"{path}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def load_hf_weights(path, params, arch, convert, tied=()):
    """Copy the weights of HF directory `path` into `params` (a state_dict), one tensor at a
    time. convert(name, tensor) gives our (name, tensor), or None for a buffer to skip; every
    name in `params` but the `tied` ones must be loaded."""
    loaded = set()
    for name, tensor in hf_tensors(path):
        converted = convert(name, tensor)
        if converted is None:
            continue
        name, tensor = converted
        if name not in params:
            raise InputError(f"{path}: unexpected weight {name!r} for {arch}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise InputError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        loaded.add(name)
    missing = set(params) - loaded - set(tied)
    if missing:
        raise InputError(f"{path}: weights missing from the checkpoint: {sorted(missing)[:5]}")


# ----------------------------------------------------------------------------------------
# data: nanoGPT's format (train.bin / val.bin of uint16 token ids; meta.json gives vocab)

STDLIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stdlib")


def stdlib_documents():
    """(name, text) pairs from what every CPython ships: pydoc's documentation topics and
    the docstrings of the pure-Python standard library (parsed with ast, nothing imported)."""
    from pydoc_data.topics import topics
    docs = [(f"topic/{k}", v) for k, v in sorted(topics.items())]
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py"))):
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] in skip:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        text = "\n\n".join(filter(None, (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))))
        if text:
            docs.append((rel, text))
    return docs


def prepare_stdlib(out=STDLIB_DIR):
    """Write the byte-level (vocab 256) stdlib dataset once; val = docs whose name hashes to
    0 mod 10 (deterministic). Files are written to temp names and renamed (atomic)."""
    if all(os.path.isfile(os.path.join(out, f)) for f in ("train.bin", "val.bin", "meta.json")):
        return out
    os.makedirs(out, exist_ok=True)
    splits = {"train": [], "val": []}
    for name, text in stdlib_documents():
        splits["val" if zlib.crc32(name.encode()) % 10 == 0 else "train"].append(text + "\n\n")
    for split, texts in splits.items():
        ids = np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        _atomic_write(os.path.join(out, f"{split}.bin"), ids.tobytes())
    meta = {"vocab_size": 256, "tokenizer": "bytes", "source": f"Python {sys.version.split()[0]} stdlib docs"}
    _atomic_write(os.path.join(out, "meta.json"), json.dumps(meta).encode())
    return out


def rank_indices(high, batch_size, generator, share=(0, 1)):
    """This rank's batch_size random indices in [0, high): one draw for all `world` ranks, of
    which rank takes its slice, so the sequences of a step depend only on world * batch_size
    (a run resumes exactly on another number of ranks, batch_size scaled to match)."""
    rank, world = share
    return torch.randint(high, (batch_size * world,), generator=generator)[rank * batch_size:][:batch_size].tolist()


def _atomic_write(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Data:
    """Random (x, y) windows of a nanoGPT-format dataset directory, checked up front."""

    def __init__(self, directory, block_size):
        if not os.path.isdir(directory):
            raise MissingInput(f"dataset={directory!r} is not a directory (expected train.bin and val.bin "
                                    "as written by nanoGPT's prepare.py, or dataset=stdlib)")
        self.dir, self.block_size = directory, block_size
        self.vocab_size, self.tokenizer = self._read_meta()
        self.paths = {}
        for split in ("train", "val"):
            path = os.path.join(directory, f"{split}.bin")
            if not os.path.isfile(path):
                raise MissingInput(f"dataset {directory!r}: {split}.bin is missing")
            size = os.path.getsize(path)
            if size % 2:
                raise InputError(f"dataset {path}: {size} bytes is not a whole number of uint16 tokens (corrupt?)")
            if size // 2 < block_size + 2:
                raise InputError(f"dataset {path}: {size // 2} tokens, fewer than block_size + 2 = {block_size + 2}")
            head = np.memmap(path, dtype=np.uint16, mode="r")[:1 << 24]
            if int(head.max()) >= self.vocab_size:
                raise InputError(f"dataset {path}: token id {int(head.max())} >= vocab_size {self.vocab_size} (corrupt, "
                                 "or a meta.json/meta.pkl with the wrong vocab_size)")
            self.paths[split] = path

    def _read_meta(self):
        meta_json, meta_pkl = os.path.join(self.dir, "meta.json"), os.path.join(self.dir, "meta.pkl")
        if os.path.isfile(meta_json):
            with open(meta_json) as f:
                meta = json.load(f)
            return int(meta["vocab_size"]), meta.get("tokenizer", "ids")
        if os.path.isfile(meta_pkl):  # nanoGPT's char-level datasets
            import pickle
            with open(meta_pkl, "rb") as f:
                meta = pickle.load(f)
            return int(meta["vocab_size"]), "ids"
        return 50304, "gpt2"  # GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT

    def batch(self, split, batch_size, generator, device="cpu", share=(0, 1)):
        data = np.memmap(self.paths[split], dtype=np.uint16, mode="r")  # re-opened: no memmap leak
        ix = rank_indices(len(data) - self.block_size - 1, batch_size, generator, share)
        xy = torch.from_numpy(np.stack([data[i:i + self.block_size + 1] for i in ix]).astype(np.int64))
        if int(xy.max()) >= self.vocab_size:
            raise InputError(f"dataset {self.paths[split]}: token id {int(xy.max())} >= vocab_size {self.vocab_size}")
        if str(device).startswith("cuda"):
            xy = xy.pin_memory().to(device, non_blocking=True)
        else:
            xy = xy.to(device)
        return xy[:, :-1], xy[:, 1:]

    def decode(self, ids):
        if self.tokenizer == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.tokenizer == "gpt2":
            try:
                import tiktoken  # optional: only to print the sample as text
                return tiktoken.get_encoding("gpt2").decode([i for i in ids if i < 50257])
            except ImportError:
                pass
        return " ".join(map(str, ids))


# ----------------------------------------------------------------------------------------
# config parsing: strict (unknown keys and wrong types are errors, before anything runs)

class InputError(ValueError):
    """A problem with what the user gave (data, checkpoint, config.json): the scripts report it
    as one line, without a traceback (tracebacks are for bugs)."""


class MissingInput(InputError, FileNotFoundError):
    """A file or directory the user named does not exist."""


def main(train_fn, script, defaults=None, optional=None, validate=None, argv=None):
    """Command line entry of both scripts: parse the config, train; bad input is one line."""
    try:
        train_fn(parse_config(sys.argv[1:] if argv is None else argv, defaults, optional, validate, script))
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        end_rank()


def end_rank():
    """The end of a torchrun rank, once its work is done and its output written: exit without
    Python's shutdown. fully_shard leaves a reference to the gloo group that Python cannot see
    or drop (torch 2.13: the group's threads are still there after destroy_process_group() and
    after the model is deleted, where without FSDP2 they end), and a gloo thread that needs the
    GIL while the interpreter finalizes aborts the process ("terminate called without an
    active exception"), now and then, after the run has succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parse_config(argv, defaults=None, optional=None, validate=None, script=__file__):
    """Defaults <- config files (Python assignments, nanoGPT style) <- --key=value, in order.
    train_llama.py calls this with its own defaults and validator. -h/--help prints the keys."""
    defaults, optional = defaults or DEFAULTS, OPTIONAL if optional is None else optional
    if "-h" in argv or "--help" in argv:
        print(config_help(script, defaults))
        raise SystemExit(0)
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"config: expected --key=value, got {arg!r}")
            _set(cfg, defaults, optional, key, _literal(value), arg)
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"config: {arg!r} is neither --key=value nor a config file")
            scope = {}
            with open(arg) as f:
                exec(f.read(), {}, scope)
            for key, value in scope.items():
                if not key.startswith("_"):
                    _set(cfg, defaults, optional, key, value, arg)
    (validate or validate_gpt2)(cfg)
    return cfg


def config_help(script, defaults):
    """The script's docstring, then every config key with its default and its comment, read
    from the config block at the top of `script` (the block is the documentation)."""
    with open(script) as f:
        source = f.read()
    doc = ast.get_docstring(ast.parse(source)) or ""
    lines = [doc, "", "Config keys (--key=value, or a config file of such assignments as Python):"]
    block = source.split("# config:", 1)[1].split("\n# ---", 1)[0].splitlines()[1:]
    for line in block:
        key, sep, rest = line.partition(" = ")
        if sep and key in defaults:
            comment = rest.split("  # ", 1)[1] if "  # " in rest else ""
            lines.append((f"  --{key}={defaults[key]!r}".ljust(40) + f" {comment}").rstrip())
        elif line.startswith("# "):
            lines.append(f" {line[2:]}:")
    return "\n".join(lines)


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --dataset=data/openwebtext


def _set(cfg, defaults, optional, key, value, where):
    if key not in defaults:
        raise SystemExit(f"config: unknown key {key!r} (from {where}); known keys: {', '.join(defaults)}")
    want = optional.get(key) or type(defaults[key])
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = (value is None and key in optional) or (want is int and is_int) or (want is float and (is_int or isinstance(value, float))) \
        or (want not in (int, float) and isinstance(value, want))
    if not ok:
        raise SystemExit(f"config: {key} must be {want.__name__}, got {value!r} (from {where})")
    cfg[key] = float(value) if want is float and value is not None else value


def config_error(msg):
    raise SystemExit(f"config: {msg}")


def validate_training(cfg, optimizers, out_prefix, default_lr=None):
    """Checks shared by train_gpt2.py and train_llama.py; fills the None defaults (out_dir:
    out_prefix-optimizer). `optimizers` maps each name to its default lr, unless default_lr(cfg)
    gives that table."""
    if cfg["optimizer"] not in optimizers:
        config_error(f"optimizer must be one of {', '.join(optimizers)}, got {cfg['optimizer']!r}")
    cfg["out_dir"] = cfg["out_dir"] or f"{out_prefix}-{cfg['optimizer']}"
    if cfg["fused"] is None:
        cfg["fused"] = cfg["optimizer"] in ("lomo", "adalomo")
    if cfg["fused"] and cfg["optimizer"] in ("adamw", "sgd"):
        config_error(f"fused=True needs a lowmem optimizer (lomo, adalomo, adam_mini), not {cfg['optimizer']}")
    if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
        config_error(f"dtype must be float32, bfloat16 or float16, got {cfg['dtype']!r}")
    if cfg["adam_mini_state"] not in ("float32", "bfloat16", "int8"):
        config_error(f"adam_mini_state must be float32, bfloat16 or int8, got {cfg['adam_mini_state']!r}")
    if cfg["amp"] and cfg["dtype"] != "float32":
        config_error("amp=True autocasts fp32 parameters; it needs dtype=float32")
    if cfg["fsdp"] and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 10):
        config_error(f"fsdp=True needs torch >= 2.10 (FSDP2 on gloo fails on 2.6 and sums instead of averaging "
                     f"on 2.7, pytorch issue 162338); this is {torch.__version__}")
    if cfg["dtype"] == "float16" and not cfg["fused"]:
        config_error("dtype=float16 needs a fused lowmem driver (its dynamic loss scaler); use bfloat16 otherwise")
    for key in ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval", "gradient_accumulation_steps"):
        if cfg[key] < 1:
            config_error(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["learning_rate"] is None:
        cfg["learning_rate"] = (default_lr(cfg) if default_lr else optimizers)[cfg["optimizer"]]
    if cfg["weight_decay"] is None:
        cfg["weight_decay"] = DEFAULT_WD[cfg["optimizer"]]
    if cfg["grad_clip"] is None:
        cfg["grad_clip"] = DEFAULT_CLIP[cfg["optimizer"]]
    if cfg["fused"] and cfg["gradient_accumulation_steps"] > 1 and cfg["dtype"] == "float16":
        config_error("gradient_accumulation_steps > 1 with fused=True cannot use float16: its loss scaler would "
                     "have to undo micro-batches already applied after an overflow in a later one (use bfloat16)")
    cfg["lr_decay_iters"] = cfg["lr_decay_iters"] or cfg["max_iters"]
    cfg["min_lr"] = cfg["learning_rate"] / 10 if cfg["min_lr"] is None else cfg["min_lr"]
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters"):
        if cfg[key] < 0:
            config_error(f"{key} must be >= 0, got {cfg[key]}")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            config_error(f"{key} must be in [0, 1), got {cfg[key]}")
    check_device(cfg["device"])


def check_device(name):
    """A device this machine has, or a config error now (not torch's assertion mid-run)."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        config_error(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        config_error(f"device={name!r}, but this torch ({torch.__version__}) sees no CUDA GPU: use --device=cpu, "
                     "or a CUDA build of torch on a machine with an NVIDIA GPU")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        config_error(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        config_error(f"device={name!r}, but MPS is not available on this machine: use --device=cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        config_error(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def validate_gpt2(cfg):
    validate_training(cfg, DEFAULT_LR, "out-gpt2")
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        if cfg[key] < 1:
            config_error(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("sample_tokens", "temperature", "top_k"):
        if cfg[key] < 0:
            config_error(f"{key} must be >= 0, got {cfg[key]}")
    if not 0 <= cfg["dropout"] < 1:
        config_error(f"dropout must be in [0, 1), got {cfg['dropout']}")
    if cfg["n_embd"] % cfg["n_head"]:
        config_error(f"n_embd ({cfg['n_embd']}) must be a multiple of n_head ({cfg['n_head']})")


# ----------------------------------------------------------------------------------------
# training helpers (shared with train_llama.py): lr schedule, optimizers, devices, checkpoints

def get_lr(it, cfg):
    """Linear warmup, then cosine (or linear) decay to min_lr at lr_decay_iters (nanoGPT)."""
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return min_lr
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    if cfg.get("lr_schedule") == "linear":  # train_llama.py's option
        return lr - ratio * (lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model, cfg):
    name, lr, wd, clip = cfg["optimizer"], cfg["learning_rate"], cfg["weight_decay"], cfg["grad_clip"] or None
    lowmem_args = dict(clip_grad_norm=clip, stochastic_rounding=cfg["stochastic_rounding"], seed=cfg["seed"],
                       accumulation_steps=cfg["gradient_accumulation_steps"] if cfg["fused"] else 1)
    if name == "adamw":  # nanoGPT's groups: decay matrices/embeddings, not biases/norms
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg["beta1"], cfg["beta2"]))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adam_mini":  # 1-D tensors are not decayed (its partition decides)
        return lowmem.AdamMini(model, lr=lr, betas=(cfg["beta1"], cfg["beta2"]), weight_decay=wd,
                               state_dtype=getattr(torch, cfg.get("adam_mini_state", "float32")), **lowmem_args)
    cls = lowmem.AdaLomo if name == "adalomo" else lowmem.LOMO
    return cls(model, lr=lr, weight_decay=wd, **lowmem_args)


def state_bytes(opt):
    """Bytes of optimizer state on this rank (torch's optimizers keep FSDP2 state as DTensors)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for s in opt.state.values() for t in s.values()
             if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local)


def peak_memory_mb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    if dev.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB (macOS: bytes)


def setup_device(name, fsdp=False):
    """(device, rank, world); under torchrun also joins the process group, and so does one
    process with fsdp (FSDP2 needs a group: a 1-rank run's checkpoint resumes on more ranks)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev, world = torch.device(name), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and fsdp:
        importlib.import_module("torch._dynamo")  # as below
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1, store=dist.HashStore())
    if world == 1:
        return dev, 0, 1
    if dev.type == "cuda":
        dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        torch.cuda.set_device(dev)
    # torch.optim imports torch._dynamo on first use, and that import keeps references to an
    # existing default group, so destroy_process_group could not free it: its gloo threads
    # outlived Python and a rank exiting right after a collective aborted ("terminate called
    # without an active exception", 5 of 125 runs of the 2-process CPU test). Imported
    # first, dynamo never sees the group and leave_process_group really ends it.
    importlib.import_module("torch._dynamo")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, dist.get_rank(), world


def leave_process_group(world):
    """Under torchrun: wait for every rank (rank 0 may still be evaluating and saving), then
    end the group while Python is fully alive."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_verified = {}  # checkpoint path -> (size, mtime) whose CRC-32s were checked


def read_checkpoint(path, mmap=False):
    """torch.load of a checkpoint after checking it: torch.load reads a file with flipped bytes
    without a word, so every record's CRC-32 (torch.save writes a zip archive) is checked first.
    A damaged file is refused by name and left as it is."""
    stat = os.stat(path)
    if _verified.get(os.path.abspath(path)) != (stat.st_size, stat.st_mtime_ns):  # read once, not per load
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # reads every record and compares its CRC-32
        except Exception as e:  # empty, truncated, not a zip: whatever cannot be read is damage
            raise InputError(f"{path} is damaged or not a checkpoint ({type(e).__name__}: {e}); it was left as it is") from None
        if bad is not None:
            raise InputError(f"{path} is damaged (record {bad!r} fails its CRC-32 check); it was left as it is")
        _verified[os.path.abspath(path)] = (stat.st_size, stat.st_mtime_ns)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:
        raise InputError(f"{path} is not a checkpoint of these scripts ({type(e).__name__}: {e})") from None


def _run_keys(config):
    """The config keys that define a run (not how it is launched, resumed or logged)."""
    ignore = {"init_from", "overwrite", "device", "compile", "log_interval", "sample_tokens", "init_from_base"}
    return {k: v for k, v in config.items() if k not in ignore}


def checkpoint_path(cfg):
    """The file a resume reads first: out_dir/ckpt.pt, or with fsdp=True the meta.pt of the
    torch.distributed.checkpoint directory that the link out_dir/ckpt-fsdp points to."""
    if not cfg["fsdp"]:
        return os.path.join(cfg["out_dir"], "ckpt.pt")
    return os.path.join(cfg["out_dir"], "ckpt-fsdp", "meta.pt")


def load_checkpoint(cfg, arch_keys):
    path = checkpoint_path(cfg)
    if not os.path.isfile(path):
        raise MissingInput(f"init_from=resume: no checkpoint at {path}")
    try:
        ckpt = read_checkpoint(path)
    except InputError as e:
        raise InputError(f"init_from=resume: {e}. Resume from a copy, or start a new run in another out_dir") from None
    saved = ckpt["config"]  # a key it lacks is from an older lowmem, which had only today's default
    changed = [f"{k}={saved[k]!r} there, {cfg[k]!r} here" for k in ("optimizer", "fsdp", *arch_keys)
               if saved.get(k, cfg[k]) != cfg[k]]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    saved_world = ckpt.get("world", world)  # older checkpoints did not say
    per_step = lambda c, w: w * c["batch_size"] * c.get("gradient_accumulation_steps", 1)  # sequences a step
    total, here = per_step(saved, saved_world), per_step(cfg, world)
    if world != saved_world and here != total:
        fixes = [f"--gradient_accumulation_steps={total // (world * cfg['batch_size'])}"] \
            if total % (world * cfg["batch_size"]) == 0 else []
        fixes += [f"--batch_size={total // (world * cfg['gradient_accumulation_steps'])}"] \
            if total % (world * cfg["gradient_accumulation_steps"]) == 0 else []
        changed.append(f"{total} sequences a step there ({saved_world} rank(s)), {here} here ({world}): "
                       + (f"on {world} rank(s) {' or '.join(fixes)} keeps them" if fixes else "no batch_size keeps them"))
    if changed:
        raise InputError(f"init_from=resume: {path} was written with other settings ({'; '.join(changed)}); "
                         "resume with the checkpoint's values, or start a new run in another out_dir")
    if cfg["fsdp"]:
        ckpt["sharded"] = os.path.dirname(os.path.realpath(path))
    return ckpt


def check_out_dir(cfg):
    """A new run must not replace a checkpoint that a different configuration wrote to out_dir.
    (The same configuration retrains to the same result, so it may: nothing is lost.)"""
    path = checkpoint_path(cfg)
    if cfg["init_from"] == "resume" or cfg["overwrite"] or not os.path.isfile(path):
        return
    hint = "choose another --out_dir, or pass --overwrite=True to replace it"
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except InputError as e:
        raise InputError(f"out_dir {cfg['out_dir']!r}: {e}. Resume from a copy, {hint}") from None
    old, new = _run_keys(ckpt["config"]), _run_keys(cfg)  # keys in one only: another lowmem version
    changed = [f"{k}={old[k]!r} there, {new[k]!r} here" for k in new if k in old and old[k] != new[k]]
    if changed:
        raise InputError(f"out_dir {cfg['out_dir']!r} holds the checkpoint of another run (iter {ckpt['iter_num']}; "
                         f"{'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}). Resume it with "
                         f"--init_from=resume, {hint}")


def save_checkpoint(cfg, model, opt, it, best_val, data_gen):
    meta = {"config": cfg, "iter_num": it, "best_val_loss": best_val, "data_rng": data_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "world": dist.get_world_size() if dist.is_initialized() else 1}
    if cfg["fsdp"]:
        return save_sharded(cfg, model, opt, meta)
    save_file({"model": model.state_dict(), "optimizer": opt.state_dict(), **meta}, checkpoint_path(cfg))


def save_file(obj, path):
    """torch.save, atomically (a crash leaves the old file intact), with CRC-32s."""
    tmp = f"{path}.tmp{os.getpid()}"
    # read_checkpoint checks the CRC-32s: never save without them, whatever the global setting
    settings = getattr(getattr(torch.utils, "serialization", None), "config", None)  # torch >= 2.6
    crc = settings.save.compute_crc32 if settings else True
    try:
        if settings:
            settings.save.compute_crc32 = True
        torch.save(obj, tmp)
    finally:
        if settings:
            settings.save.compute_crc32 = crc
    os.replace(tmp, path)


# FSDP2 checkpoints: torch.distributed.checkpoint (DCP) writes each rank's rows of every tensor
# once, with their place in the whole tensor, and loads onto any number of ranks the rows each
# holds there. lowmem's optimizers give their state that way with sharded_state_dict(); torch's
# through DCP's own get/set_optimizer_state_dict.

def sharded_state(model, opt):
    if hasattr(opt, "sharded_state_dict"):
        optimizer = opt.sharded_state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        optimizer = get_optimizer_state_dict(model, opt)
    return {"model": model.state_dict(), "optimizer": optimizer}


def save_sharded(cfg, model, opt, meta):
    """Every rank writes into a new directory ckpt-fsdp-<iter>; rank 0 adds meta.pt and then moves
    the link ckpt-fsdp to it (an atomic rename: a crash leaves the previous checkpoint whole)."""
    import torch.distributed.checkpoint as dcp
    link = os.path.join(cfg["out_dir"], "ckpt-fsdp")
    target = f"{link}-{meta['iter_num']:08d}"
    if os.path.realpath(link) == os.path.realpath(target):  # never write into the linked one
        target += "-2"
    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)  # left by a save that crashed
    dist.barrier()
    model.reshard()  # an eval forward leaves the root's parameters gathered
    dcp.save(sharded_state(model, opt), checkpoint_id=target)
    if dist.get_rank() == 0:
        save_file(meta, os.path.join(target, "meta.pt"))
        tmp = f"{link}.tmp{os.getpid()}"
        os.symlink(os.path.basename(target), tmp)
        os.replace(tmp, link)
        for old in glob.glob(f"{link}-*"):
            if old != target:
                shutil.rmtree(old)
    dist.barrier()


def load_sharded(model, opt, directory):
    import torch.distributed.checkpoint as dcp
    state = sharded_state(model, opt)
    dcp.load(state, checkpoint_id=directory)
    model.load_state_dict(state["model"])
    if hasattr(opt, "sharded_state_dict"):
        return opt.load_state_dict(state["optimizer"])
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state["optimizer"])


def shard_model(model):
    """FSDP2: every block (each entry of the model's ModuleLists) and the root become
    fully_shard units: PyTorch's own sharding engine, data parallel across the ranks."""
    from torch.distributed.fsdp import fully_shard
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


if __name__ == "__main__":
    main(train, __file__)
