"""lowmem: LOMO, AdaLomo and Adam-mini in one readable file that needs only torch.

    LOMO      SGD fused into backward: each gradient is applied and freed as soon as it
              exists, so gradient memory is one tensor and optimizer state is zero.
    AdaLomo   LOMO + Adafactor's factored second moment + grouped update normalization.
    AdamMini  AdamW with one second-moment value per Hessian block (head, neuron, token).

The update rules come first, as functions of fp32 tensors that a reader can lift out whole:
lomo_update, adalomo_update and adam_mini_update (section 1). Then the machinery: the Adam-mini
block partitioner (2), the shared driver (3), the optimizer classes that call the rules (4),
the C/CUDA kernels that do the same math in one pass (5), FSDP2 sharding (6), validation and
checkpoints (7), and a tour (`python lowmem.py`). Every optimizer is a torch.optim.Optimizer:

    classic:  loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    fused:    opt.fused_backward(loss)    # update inside backward, no gradient memory

and inside loops you did not write (HF Trainer, Lightning, nanoGPT), construct with
update_in_backward=True: every loss.backward() is the update, step() and zero_grad() no-ops.
Math is fp32, written back to the parameter dtype (bf16 optionally by stochastic rounding).
DESIGN.md derives the rules and lists the facts the code relies on; RESULTS.md has the measurements.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["lomo_update", "adalomo_update", "adam_mini_update", "quantize_blocks", "dequantize_blocks", "LOMO",
           "AdaLomo", "AdamMini", "partition", "Partition", "Blocks", "DynamicLossScaler", "kernels"]

# ----------------------------------------------------------------------------------------
# 1. The update rules. Each updates the fp32 weights p and its state in place from the fp32
# gradient g, and returns p. They use only math and torch. `geo` says where sums over the
# whole tensor come from: None is the whole tensor, here (FSDP2's version is in section 6).


def lomo_update(p, g, lr, weight_decay=0.0):
    """LOMO (LOMO paper, section 3.2; DESIGN.md "LOMO"): plain SGD, applied the moment g exists.

        p <- p * (1 - lr*weight_decay) - lr * g"""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    return p.add_(g, alpha=-lr)


class Whole:
    """A tensor's statistics come from all of it, on this process: every sum is the identity.
    Under FSDP2 a rank holds some rows, and `Shard` (section 6) sums over the ranks instead."""
    sharded = False

    def __init__(self, shape):
        self.shape, self.numel = tuple(shape), math.prod(shape)

    def total(self, x):  # the sum of x, a statistic of the rows held here, over the ranks
        return x

    def totals_over_rows(self, *sums):  # total() of a matrix's column sums, in one collective
        return sums

    def my_rows(self, x):  # the rows held here (dim 0) of per-row values of the whole tensor
        return x

    def place_rows(self, x):  # per-row values of the rows held here, in the whole tensor's
        return x


def ema_(x, new, beta):
    """x <- beta*x + (1-beta)*new: every second moment below."""
    return x.mul_(beta).add_(new, alpha=1 - beta)


def rms(x, geo):
    """Root mean square of the whole tensor: ||x|| / sqrt(numel)."""
    return (geo.total(x.float().square().sum()) / max(geo.numel, 1)).sqrt()


def adalomo_beta2(step, decay_rate):
    """AdaLomo's (Adafactor's) second-moment decay at step t = 1, 2, ...: 1 - t**decay_rate."""
    return 1.0 - step ** decay_rate


def adalomo_factors(row, col, row_sums, col_sums, beta2t, geo):
    """Adafactor's factored second moment of u = g*g + eps1 (over the last two dims), from u's
    sums over each row and each column:
        R <- ema(R, mean(u, -1)),  C <- ema(C, mean(u, -2))
    Returns 1/sqrt(R / mean(R)) as a column and 1/sqrt(C) as a row: their product is the
    rank-1 estimate of 1/sqrt(v), element by element."""
    rows, cols = geo.shape[-2], col.shape[-1]  # rows of the whole matrix (a rank may hold some)
    ema_(row, row_sums / cols, beta2t)
    col_sums, row_total = geo.totals_over_rows(col_sums, row.sum(dim=-1, keepdim=True))
    ema_(col, col_sums / rows, beta2t)
    return (row / (row_total / rows)).rsqrt_().unsqueeze(-1), col.rsqrt().unsqueeze(-2)


def adalomo_update(p, g, moments, step, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                   weight_decay=0.0, geo=None):
    """AdaLomo (AdaLomo paper, Algorithm 1; DESIGN.md "AdaLomo"): an adaptive LOMO without first moment.

        u = g*g + eps1,  beta2_t = 1 - step**decay_rate
        matrix: R, C factored moments of u (adalomo_factors),  update = g / sqrt(R/mean(R)) / sqrt(C)
        vector: v <- beta2_t*v + (1-beta2_t)*u,                update = g / sqrt(v)
        update <- update / max(1, RMS(update) / clip_threshold)   (grouped update normalization)
        lr_t = lr * max(eps2, RMS(p));  p <- p*(1 - lr_t*weight_decay) - lr_t*update
    moments: (R, C) for a tensor of two or more dims (its last two are factored), else (v,)."""
    geo = geo or Whole(p.shape)
    (eps1, eps2), beta2t = eps, adalomo_beta2(step, decay_rate)
    u = g * g + eps1
    if g.dim() >= 2:
        r, c = adalomo_factors(*moments, u.sum(dim=-1), u.sum(dim=-2), beta2t, geo)
        update = (r * c).mul_(g)
    else:
        update = ema_(moments[0], u, beta2t).rsqrt().mul_(g)
    update.div_((rms(update, geo) / clip_threshold).clamp_(min=1.0))
    lr_t = lr * rms(p, geo).clamp(min=eps2)  # RMS before decay; a tensor: no host sync
    if weight_decay:
        p.mul_(1 - lr_t * weight_decay)
    return p.sub_(update.mul_(lr_t))


def row_dims(blocks):
    """The dims that index a tensor's rows (output neurons): its output axis, and for stacked
    MoE experts (experts, out, in) the expert too, axis (0, 1): a row is one expert's neuron."""
    return blocks.axis if isinstance(blocks.axis, tuple) else (blocks.axis,)


def block_means(row_sums, blocks, geo):
    """Adam-mini: mean(g*g) of each block from the sums of g*g over each output row (the rows
    held here), so that a block (a head) split between two ranks still gets its exact mean."""
    dims = row_dims(blocks)
    if 0 in dims:
        row_sums = geo.place_rows(row_sums)
    row = geo.total(row_sums).reshape(-1) / (geo.numel // math.prod(geo.shape[d] for d in dims))  # rows all one size
    return torch.cat([row[a:b].view(-1, k).mean(1) for a, b, k in blocks.segments])


def block_mean_sq(g, blocks, geo):
    """mean(g*g) over each block: (n_v,), or g's shape for element blocks (plain Adam)."""
    if blocks.kind == "element":
        return g * g
    if blocks.kind == "tensor":
        return geo.total((g * g).sum().reshape(1)) / geo.numel
    return block_means((g * g).sum(dim=[d for d in range(g.dim()) if d not in row_dims(blocks)]), blocks, geo)


def expand_blocks(v, blocks, shape, geo):
    """(n_v,) per-block values -> a tensor that broadcasts against the parameter (rows held here)."""
    if blocks.kind == "element":
        return v
    if blocks.kind == "tensor":  # one value, shaped to broadcast in place (a 0-d p included)
        return v.reshape([1] * len(shape))
    per_block = v.split([(b - a) // k for a, b, k in blocks.segments])
    rows = torch.cat([part.repeat_interleave(k) for part, (_, _, k) in zip(per_block, blocks.segments)])
    dims = row_dims(blocks)
    rows = rows.view([geo.shape[d] for d in dims])
    rows = geo.my_rows(rows) if 0 in dims else rows
    return rows.view([shape[d] if d in dims else 1 for d in range(len(shape))])


def adam_mini_update(p, g, m, v, blocks, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, geo=None):
    """Adam-mini (Adam-mini paper, Algorithm 1; DESIGN.md "Adam-mini"): AdamW with one v per block of p (`partition`).

        m   <- b1*m + (1-b1)*g
        v_b <- b2*v_b + (1-b2)*mean(g*g over block b)
        p   <- p*(1 - lr*weight_decay) - lr * (m / (1-b1^t)) / (sqrt(v_b / (1-b2^t)) + eps)
    v holds blocks.n_v values (p's shape for element blocks, which is AdamW); t = step."""
    geo = geo or Whole(p.shape)
    adam_mini_fold(g, m, v, blocks, betas, True, geo)
    return adam_mini_apply(p, m, v, blocks, step, lr, betas, eps, weight_decay, geo)


def adam_mini_fold(g, m, v, blocks, betas, first, geo):
    """Adam-mini's moments from g: the first (or only) gradient of a step decays them, the
    next ones of the same step (gradient accumulation, k micro-batches) add to them:
        first:  m <- b1*m + (1-b1)*g,   v_b <- b2*v_b + (1-b2)*mean(g*g over block b)
        next:   m <- m + (1-b1)*g,      v_b <- v_b + (1-b2)*mean(g*g over block b)
    After k micro-batches m = b1*m + (1-b1)*(g_1 + ... + g_k): the accumulated gradient's m,
    exactly. v has S, the sum of the micro-batches' mean(g*g); the accumulated gradient G's
    mean(G*G) also has their cross terms, which adam_mini_agreement estimates."""
    b1, b2 = betas
    ms = block_mean_sq(g, blocks, geo)
    if first:
        m.lerp_(g, 1 - b1)
        return ema_(v, ms, b2)
    m.add_(g, alpha=1 - b1)
    return v.add_(ms, alpha=1 - b2)


def adam_mini_agreement(m, v, blocks, step, betas, k, geo):
    """After k micro-batches folded into m and v (adam_mini_fold): v's share of the cross terms.
    With g_i = mu + noise_i, E[mean(G*G)] = E[S] + k*(k-1)*mean(mu*mu): the micro-batches'
    agreement, which no single one of them shows. k*mu is G's mean, which the bias-corrected
    m estimates, so the term is (1 - 1/k)*mean(m_hat*m_hat), measured against the truth in
    DESIGN.md "Gradient accumulation". Never below S; k = 1 adds nothing."""
    b1, b2 = betas
    agree = block_mean_sq(m, blocks, geo) / (1 - b1 ** step) ** 2
    return v.add_(agree, alpha=(1 - b2) * (1 - 1 / k))


def adam_mini_apply(p, m, v, blocks, step, lr, betas, eps, weight_decay, geo):
    """Adam-mini's weight update from its moments, with bias correction for step t."""
    b1, b2 = betas
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    denom = (v.sqrt() / math.sqrt(1 - b2 ** step)).add_(eps)
    return p.addcdiv_(m, expand_blocks(denom, blocks, p.shape, geo), value=-lr / (1 - b1 ** step))


# Adam-mini's first moment in 8 bits (AdamMini(state_dtype=torch.int8)): m is kept as int8 codes,
# each run of QBLOCK elements of a row (dim 0; a row's last run may be shorter) with one fp32
# scale, and taken back to fp32 around the rule above. Linear codes fit Adam-mini: its update is
# m / sqrt(v_b) with v_b shared by a whole block of rows, so m's error counts in absolute terms,
# which absmax scaling bounds by half a step in every element (DESIGN.md "A first moment in bf16 or 8 bits").
QBLOCK = 256


def quantize_blocks(m, codes, scales, noise=None):
    """fp32 m -> its int8 codes and (rows, ceil(cols/QBLOCK)) fp32 scales, in place:

        code = round(m * 127 / a)  in -127..127,  scale = a / 127,   a = max(|m| over the block)
    round: to nearest (noise None), or floor(m*127/a + noise) with noise uniform in [0, 1),
    stochastic rounding (unbiased). A NaN in m makes its block's scale NaN: NaN stays NaN.
    A block whose 127/a is not finite (all zeros, a NaN or inf, a < 3.7e-37) gets codes 0."""
    rows, cols = codes.shape[0], math.prod(codes.shape[1:])
    x = F.pad(m.reshape(rows, cols), (0, -cols % QBLOCK)).view(rows, scales.shape[1], QBLOCK)
    a = x.abs().amax(-1, keepdim=True)
    torch.div(a.squeeze(-1), 127, out=scales)
    inv = 127 / a
    q = x * inv.where(inv.isfinite(), 0)
    q = q.round_() if noise is None else q.add_(noise).floor_()
    q = q.nan_to_num_(0.0).clamp_(-127, 127).flatten(1)[:, :cols]  # NaN * 0: 0; x*127/a may be 127 and a bit
    return codes.copy_(q.reshape(codes.shape))


def dequantize_blocks(codes, scales):
    """The fp32 m of quantize_blocks' codes: code * the scale of its block."""
    x = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).float()
    return x.mul_(scales.repeat_interleave(QBLOCK, dim=1)[:, :x.shape[1]]).view(codes.shape)


# ----------------------------------------------------------------------------------------
# 2. The Adam-mini block partitioner (paper section 2.3; released code 1.1.1 rules)
#
# One second-moment value v is shared by every element of a block. Blocks by tensor:
#   token   embedding / output head: one v per row (= per vocabulary token)
#   head    query / key: one v per attention head (a run of head_dim output rows)
#   qkv     fused q|k|v matrix (GPT-2 c_attn; GPT-NeoX, Bloom and Falcon query_key_value,
#           which interleave them per group of heads): q and k by head, v by neuron
#   neuron  other dense weights (value, attention out, MLP, conv): one v per output neuron;
#           stacked MoE experts (experts, out, in): one v per output neuron of each expert
#   element biases: plain Adam, one v per element
#   tensor  norms and everything else: one v for the whole tensor
# Unlike the released code we decide by module structure, not only by name substrings,
# so GPT-2's fused c_attn, HF Conv1D's (in, out) layout, GQA and head_dim != dim/n_heads
# all get the right blocks, and unknown head counts raise instead of guessing.

QK_NAMES = {"q_proj", "k_proj", "wq", "wk", "query", "key", "to_q", "to_k", "q", "k"}
FUSED_QKV_NAMES = {"c_attn", "qkv_proj", "qkv", "wqkv", "in_proj"}  # all q rows, then k, then v
GROUPED_QKV_NAMES = {"query_key_value"}  # per kv group: its q heads, then its k and v head
OUTPUT_NAMES = {"lm_head", "output", "embed_out", "final_layer"}
EMBED_NAMES = ("embed", "embd", "wte", "wpe")  # substrings, for bare parameters
HEAD_KEYS = ("n_head", "n_heads", "num_attention_heads", "num_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "n_kv_head", "num_kv_heads")
HEAD_DIM_KEYS = ("head_dim", "kv_channels")


@dataclass
class Blocks:
    """How one tensor is cut into Adam-mini blocks.

    Rows along `axis` (the output axis: 0 for nn.Linear/Embedding, 1 for HF Conv1D) are
    grouped: each segment (start, stop, rows_per_block) gives (stop-start)/rows_per_block
    blocks. `element` and `tensor` kinds have no axis."""
    name: str
    shape: tuple
    kind: str
    n_v: int
    axis: int = None
    segments: tuple = ()
    decay: bool = True

    def layout(self):
        """The blocks in words: "4 of 8 rows" is four blocks of eight output rows; a fused
        attention matrix names its q, k and v parts, and its groups when they repeat."""
        if not self.segments:
            return "each element" if self.kind == "element" else "whole tensor"
        parts = [f"{(b - a) // k} of {k} row{'s' * (k > 1)}" for a, b, k in self.segments]
        if isinstance(self.axis, tuple):
            return f"{parts[0]} ({self.shape[0]} experts x {self.shape[self.axis[1]]})"
        if self.kind != "qkv":
            return ", ".join(parts)
        parts = [f"{part} {p}" for part, p in zip("qkv" * len(parts), parts)]
        groups = len(parts) // 3
        if groups > 1 and parts == parts[:3] * groups:
            return f"{groups} groups: " + ", ".join(parts[:3])
        return ", ".join(parts)


class Partition(list):
    """A list of Blocks, one per trainable tensor, that prints as a table."""

    def __str__(self):
        rows = [("name", "shape", "kind", "v entries", "params", "blocks")]
        rows += [(b.name, "x".join(map(str, b.shape)) or "scalar", b.kind, f"{b.n_v:,}",
                  f"{math.prod(b.shape):,}", b.layout()) for b in self]
        n_v, n_p = sum(b.n_v for b in self), sum(math.prod(b.shape) for b in self)
        rows.append(("total", "", "", f"{n_v:,}", f"{n_p:,}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"Adam-mini keeps {n_v:,} second-moment values where Adam keeps "
                     f"{n_p:,} ({100 * n_v / max(n_p, 1):.4f}%).")
        return "\n".join(lines)


def _find(objects, keys):
    for obj in objects:
        for key in keys:
            value = getattr(obj, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


class _Heads:
    """Attention head geometry: given, read from the model's config (or its text config, where a
    multimodal model nests it: Gemma 3, LLaVA, Qwen2-VL), or derived from the first query
    tensor (head_dim = q rows / n_heads: right even when head_dim != dim/n_heads, where the
    released code's dim*dim/n_heads silently gives wrong blocks)."""

    def __init__(self, model, n_heads, n_kv_heads, head_dim):
        config = getattr(model, "config", None)
        text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
        objs = [o for o in (model, config, text) if o is not None]
        self.given_head_dim = head_dim
        self.n_heads = n_heads or _find(objs, HEAD_KEYS)
        self.n_kv_heads = n_kv_heads or _find(objs, KV_HEAD_KEYS) or self.n_heads
        cfg = objs[-1] if objs else None  # Falcon-7B's multi-query attention: one k and v head, whatever num_kv_heads says
        if getattr(cfg, "multi_query", False) is True and not getattr(cfg, "new_decoder_architecture", False):
            self.n_kv_heads = n_kv_heads or 1
        self.head_dim = head_dim or _find(objs, HEAD_DIM_KEYS)

    def infer_head_dim(self, rows, fused):
        if self.head_dim is None and self.n_heads:
            self.head_dim = rows // (self.n_heads + 2 * self.n_kv_heads if fused else self.n_heads)

    def require(self, name):
        if self.head_dim is None:
            raise ValueError(
                f"Adam-mini partition: '{name}' is a query/key weight but the number of "
                "attention heads is unknown (no n_head/num_attention_heads/head_dim on the "
                "model or its config). Pass n_heads= (and n_kv_heads= for GQA, head_dim= "
                "if it is not dim/n_heads).")
        return self.head_dim


def _module_of(model):
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), module)
    return owners


def _owner_name(name):
    parts = name.lower().split(".")
    return parts[-1], (parts[-2] if len(parts) > 1 else "")


def _output_axis(module):
    return 1 if type(module).__name__ == "Conv1D" else 0  # HF Conv1D weight is (in, out)


def _classify(name, p, module, heads, attention=None):
    """The blocks of one tensor; `attention` is the module holding it and its siblings (a
    q_proj's attention module), whose own head_dim, where it has one, wins over the model's:
    a vision tower's heads are not the language model's."""
    leaf, owner = _owner_name(name)
    shape, numel = tuple(p.shape), p.numel()
    if "bias" in leaf:
        return Blocks(name, shape, "element", numel, decay=False)
    if p.dim() < 2:
        return Blocks(name, shape, "tensor", 1, decay=False)
    axis = _output_axis(module)
    rows = shape[axis]

    def by_rows(kind, *segments):
        for a, b, k in segments:
            if (b - a) % k or b > rows:
                raise ValueError(f"Adam-mini partition: '{name}' has {rows} output rows, which do "
                                 f"not split into heads of {k}; pass n_heads/n_kv_heads/head_dim")
        return Blocks(name, shape, kind, sum((b - a) // k for a, b, k in segments), axis, tuple(segments))

    if p.dim() == 3 and (owner == "experts" or type(module).__name__.endswith("Experts")):
        out = 2 if getattr(module, "is_transposed", False) else 1  # transformers' (experts, in, out) layout
        n = shape[0] * shape[out]
        return Blocks(name, shape, "neuron", n, (0, out), ((0, n, 1),))
    if leaf == "in_proj_weight":  # nn.MultiheadAttention: q|k|v stacked, its own head count
        hd = module.head_dim
        return by_rows("qkv", (0, rows // 3, hd), (rows // 3, 2 * rows // 3, hd), (2 * rows // 3, rows, 1))
    if owner in FUSED_QKV_NAMES:
        hd = heads.require(name)
        q = heads.n_heads * hd if heads.n_heads else rows // 3
        k = heads.n_kv_heads * hd if heads.n_kv_heads else q
        return by_rows("qkv", (0, q, hd), (q, q + k, hd), (q + k, rows, 1))
    if owner in GROUPED_QKV_NAMES:  # rows of one group: n_heads / n_kv_heads q heads, one k head, one v head
        hd, groups = heads.require(name), heads.n_kv_heads or 1
        per = rows // groups
        return by_rows("qkv", *[s for g in range(groups) for s in (
            (g * per, (g + 1) * per - 2 * hd, hd), ((g + 1) * per - 2 * hd, (g + 1) * per - hd, hd), ((g + 1) * per - hd, (g + 1) * per, 1))])
    if owner in QK_NAMES:
        return by_rows("head", (0, rows, heads.given_head_dim or _find([attention], ("head_dim",)) or heads.require(name)))
    if isinstance(module, nn.Embedding) or owner in OUTPUT_NAMES or (
            module is None and any(s in name.lower() for s in EMBED_NAMES)):
        return by_rows("token", (0, rows, 1))
    return by_rows("neuron", (0, rows, 1))


def _heads_of(model, named, owners, n_heads=None, n_kv_heads=None, head_dim=None):
    """The head geometry: given, from the config, or head_dim from the first query (or fused
    qkv) tensor of `named`."""
    heads = _Heads(model, n_heads, n_kv_heads, head_dim)
    for name, p in named:
        leaf, owner = _owner_name(name)
        fused = owner in FUSED_QKV_NAMES | GROUPED_QKV_NAMES
        if (fused or owner in {"q_proj", "wq", "query", "to_q", "q"}) and p.dim() >= 2:
            heads.infer_head_dim(p.shape[_output_axis(owners.get(id(p)))], fused)
            break
    return heads


def partition(model_or_named_params, n_heads=None, n_kv_heads=None, head_dim=None):
    """Adam-mini blocks of every trainable tensor, as a printable Partition (a list).

    Accepts an nn.Module (structure-aware) or an iterable of (name, parameter) pairs
    (name-based only, weights assumed (out, in)). Tied parameters appear once."""
    model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
    named = [(n, p) for n, p in (model.named_parameters() if model else model_or_named_params)
             if p.requires_grad]
    owners = _module_of(model) if model else {}
    modules = dict(model.named_modules()) if model else {}
    heads = _heads_of(model, named, owners, n_heads, n_kv_heads, head_dim)
    return Partition(_classify(n, p, owners.get(id(p)), heads, modules.get(n.rsplit(".", 2)[0])) for n, p in named)


def _cut_pairs(named, heads):
    """AdamMini's blocks of the trainable (name, parameter) pairs, and the frozen ones, waiting
    to be cut when unfrozen, with the head geometry to cut them by."""
    blocks = {p: _classify(n, p, None, heads) for n, p in named if p.requires_grad}
    return blocks, {p: (n, heads) for n, p in named if not p.requires_grad}


# ----------------------------------------------------------------------------------------
# 3. The shared driver: the per-parameter pipeline (unscale, clip, the rule, write-back), the
# classic step(), the fused drivers (hooks inside backward), clipping and fp16 loss scaling


class DynamicLossScaler:
    """fp16 loss scaling: halve on overflow (min 1), double after `window` clean steps.

    Unlike the official LOMO scaler it grows back, and needs no torch.distributed."""

    def __init__(self, init_scale=2.0 ** 16, factor=2.0, window=1000, min_scale=1.0):
        self.scale, self.factor, self.window, self.min_scale = init_scale, factor, window, min_scale
        self.clean_steps = 0

    def update(self, overflow):
        if overflow:
            self.scale, self.clean_steps = max(self.scale / self.factor, self.min_scale), 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.window:
                self.scale, self.clean_steps = self.scale * self.factor, 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def _prepare_grad(grad, prep):
    """The gradient a rule sees (DESIGN.md "The gradient a rule sees"): g = grad * inv_scale (fp16
    loss scaling), clamped to +-clip (clip_grad_value), times coef (clip_grad_norm)."""
    inv_scale, clip, coef = prep
    g = grad.float() if grad.dtype != torch.float32 else grad
    if inv_scale != 1.0:
        g = g * inv_scale
    if clip:
        g = g.clamp(-clip, clip)
    return g * coef if coef != 1.0 else g


def _stochastic_round_bf16(x, generator):
    """Round fp32 -> bf16 up or down with probability proportional to the distance, so
    updates below half a bf16 ulp survive on average (plain rounding would drop them)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536  # add to the 16 dropped bits, then truncate
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class _LowMemOptimizer(torch.optim.Optimizer):
    """Shared driver. A subclass creates its state lazily and calls its rule in
    `_update(p, w, g, group, state, lr)`: w is p's data (or this rank's rows of it) in fp32, g
    the prepared fp32 gradient; w is written back to p's dtype afterwards. `_kernel_update`
    (section 5) does the same on the C/CUDA kernels and returns False where they cannot."""

    def __init__(self, model_or_params, defaults, clip_grad_norm=None, clip_grad_value=None,
                 loss_scale=None, stochastic_rounding=False, seed=0, update_in_backward=False, accumulation_steps=1):
        groups, self._names = _param_groups(model_or_params)
        params = _check_driver_args(groups, self._names, clip_grad_norm, clip_grad_value,
                                    loss_scale, update_in_backward, accumulation_steps)
        _check_settings(self, defaults, groups)
        self._geo, self._shard_mesh = _geometries(params, self._names)  # Whole, or Shard (FSDP2)
        self._kernel_args = {}  # section 5: each parameter's checked state addresses, kept between steps
        super().__init__(groups, defaults)
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.stochastic_rounding, self.seed = stochastic_rounding, seed
        for device_type in {p.device.type for p in params}:
            _load(device_type)  # build/choose kernels now: a bad LOWMEM_KERNELS fails here, not mid-backward
        fp16 = any(p.dtype == torch.float16 for p in params)
        self.loss_scaler = DynamicLossScaler() if (loss_scale is None and fp16) else None
        self.static_loss_scale = loss_scale or 1.0
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._generators, self._sr_calls = {}, 0
        self._mode, self._lr, self._clip_coef, self._sumsq, self._pending_norm = None, None, None, None, None
        # The hook is registered once. Unless update_in_backward=True it does nothing outside
        # fused_backward/grad_norm (the official code's hooks are permanent: any backward
        # updated weights, so nobody could run a plain backward on the model).
        self.update_in_backward = update_in_backward
        # Gradient accumulation in the fused drivers: the micro-batches (backward passes) since the
        # last optimizer step, and the parameters they reached, in order (each one's first is decayed).
        self.accumulation_steps, self._micro, self._window = accumulation_steps, 0, {}
        self._in_caller_backward = False
        self._hooks, self._hooked = [], set()
        self._register_hooks(params)

    # -- per-parameter pipeline shared by both drivers --------------------------------

    @property
    def loss_scale(self):
        return self.loss_scaler.scale if self.loss_scaler else self.static_loss_scale

    def _apply(self, p, grad, scale, lr, clip_coef, micro=False):
        """Unscale, value clip, norm-clip coefficient, then the rule: in one fused kernel when
        possible, else the PyTorch rule. A sharded parameter is updated through its local rows
        (grad is already local). micro: grad is a micro-batch's, in a fused driver accumulating
        (the optimizer's _micro_batch)."""
        group, state = self._group_of[p], self.state[p]
        lr = group["lr"] if lr is None else lr
        prep = _Prep(1.0 / scale, self.clip_grad_value or 0.0, 1.0 if clip_coef is None else clip_coef)
        x = p.to_local() if self._geo[p].sharded else p
        if micro:
            first = p not in self._window
            self._window[p] = self._window.get(p, 0) + 1  # p's micro-batches in this step
            return self._micro_batch(p, x, grad, prep, group, state, lr, first)
        self._rule(p, x, grad, prep, group, state, lr)

    def _rule(self, p, x, grad, prep, group, state, lr):
        if _kernel_ok(x, grad) and self._kernel_update(p, x, grad, prep, group, state, lr):
            return
        w = x.float() if x.dtype != torch.float32 else x
        self._update(p, w, _prepare_grad(grad, prep), group, state, lr)
        if w is not x:
            self._write_back(x, w)

    def _kernel_update(self, p, x, grad, prep, group, state, lr):
        return False  # the optimizers point this at their kernel path (section 5)

    def _write_back(self, x, w):
        if self.stochastic_rounding and x.dtype == torch.bfloat16:
            x.copy_(_stochastic_round_bf16(w, self._generator(x.device)))
        else:
            x.copy_(w)

    def _generator(self, device):
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _sr_seed(self, x):
        """(stochastic?, seed) for the kernels' rounding of x's new values (0, 0: to nearest)."""
        if not (self.stochastic_rounding and x.dtype == torch.bfloat16):
            return 0, 0
        return 1, self._next_seed()

    def _next_seed(self):
        """A new seed for each kernel call that rounds stochastically (reproducible: in state_dict)."""
        self._sr_calls += 1
        return (self.seed * 0x9E3779B97F4A7C15 + self._sr_calls) % 2 ** 64

    def _reduce_across_ranks(self, p, grad, scale):
        """Fused driver under torch.distributed: average the (unscaled, fp32) gradient. FSDP2
        has averaged a sharded parameter's gradient already (its reduce-scatter): this rank's
        rows are used as they are, so nothing is reduced twice."""
        if self._geo[p].sharded:
            return self._geo[p].grad_rows(grad), scale
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return grad, scale
        g = grad.float() / scale
        dist.all_reduce(g, op=dist.ReduceOp.SUM)  # SUM then divide: gloo has no AVG
        return g.div_(dist.get_world_size()), 1.0

    # -- clipping by global norm ------------------------------------------------------------

    def _add_sumsq(self, p, grad, scale):
        """Norm pass: add grad's squared norm on the device, sharded and replicated apart."""
        self._sumsq[1 if self._geo[p].sharded else 0] += _grad_sumsq(grad, scale)

    def _norm_from_sumsq(self):
        """The global gradient norm: one collective per step (not per tensor) sums the shards."""
        if self._shard_mesh is not None:
            dist.all_reduce(self._sumsq[1:], group=self._shard_mesh.get_group())
        norm, self._sumsq = self._sumsq.sum().sqrt(), None
        return norm

    def _clip_coef_from(self, total_norm, parts=1):
        """The clipping coefficient of a gradient of norm total_norm, one of `parts` micro-batches
        of a fused accumulated step: each is clipped to clip_grad_norm / parts, so their sum never
        exceeds clip_grad_norm (the triangle inequality), and when they agree (equal gradients)
        this is clipping the sum exactly."""
        if self.clip_grad_norm is None:
            return None
        return min(1.0, self.clip_grad_norm / parts / (float(total_norm) + 1e-6))  # one sync per step

    # -- classic driver -----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Classic driver: apply the rule to every parameter holding a .grad.

        The user owns loss scaling here (no scaler is applied); clipping is applied."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # update_in_backward: the closure's backward is the update
        self._end_window()
        self._register_hooks(self._group_of)  # parameters unfrozen since (Adam-mini: their blocks, before the update)
        grads = {p: self._geo[p].grad_rows(p.grad) if self._geo[p].sharded else p.grad
                 for g in self.param_groups for p in g["params"] if p.grad is not None}
        clip_coef = None  # replicated .grad is synced by DDP in this driver, sharded by FSDP2
        if self.clip_grad_norm is not None and grads:
            self._sumsq = torch.zeros(2, device=next(iter(grads.values())).device)
            for p, grad in grads.items():
                self._add_sumsq(p, grad, 1.0)
            clip_coef = self._clip_coef_from(self._norm_from_sumsq())
        with _batched():  # one kernel call per kernel for all the tensors
            for p, grad in grads.items():
                self._apply(p, grad, 1.0, None, clip_coef)
        return loss

    # -- fused driver -------------------------------------------------------------------

    @torch.no_grad()
    def _hook(self, p):
        if self._mode is None:  # the caller's own loss.backward()
            if not self.update_in_backward:
                return  # let .grad accumulate as usual
            self._caller_backward_starts()
        grad, scale = self._reduce_across_ranks(p, p.grad, self.loss_scale)
        p.grad = None  # freed once applied: peak gradient memory is one tensor
        if self._mode == "norm":
            self._add_sumsq(p, grad, scale)  # on device: no sync
        else:
            self._apply(p, grad, scale, self._lr, self._clip_coef, self.accumulation_steps > 1)  # micro: accumulating

    def _register_hooks(self, params):
        """The gradient hook on each parameter that trains and has none yet. A parameter frozen
        when it joined a group and unfrozen later gets its hook at the start of the next
        fused_backward or step() (which then applies the .grad it has meanwhile, as step() does)."""
        for p in params:
            if p.requires_grad and p not in self._hooked:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
                self._hooked.add(p)

    def _caller_backward_starts(self):
        """update_in_backward: the first hook of each backward of the caller's. More backward
        passes without step() than accumulation_steps (1: each backward is a step) are refused
        before their first update: the gradients would be accumulated into a step already taken."""
        if self._in_caller_backward:
            return
        if self._micro >= self.accumulation_steps:
            k = self.accumulation_steps
            raise RuntimeError(
                f"update_in_backward=True: backward() number {k + 1} ran without optimizer.step(), and this "
                f"optimizer accumulates {k} micro-batch{'es' if k > 1 else ''} a step (accumulation_steps={k}). "
                "For gradient accumulation (e.g. the HF Trainer's gradient_accumulation_steps=n) build it "
                "with accumulation_steps=n; every micro-batch's gradient is then used in its backward.")
        self._in_caller_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._caller_backward_ends)

    def _caller_backward_ends(self):
        self._in_caller_backward, self._micro = False, self._micro + 1

    # -- gradient accumulation in the fused drivers (accumulation_steps=k) -------------------

    def _micro_batch(self, p, x, grad, prep, group, state, lr, first):
        """Use one micro-batch's gradient of p (first: p's first in this step). LOMO's: applied at
        once, at the full lr (the caller's loss is divided by k, so the k gradients add up to the
        step's), weight decay only with the first; AdaLomo's: one step at lr/k (section 4)."""
        self._rule(p, x, grad, prep, group if first else dict(group, weight_decay=0.0), state, lr)

    def _finish_step(self):
        """The end of an accumulated step: Adam-mini moves the weights (section 4); LOMO and
        AdaLomo have already."""

    @torch.no_grad()
    def _end_window(self):
        if self._window:
            self._finish_step()
        self._micro, self._window = 0, {}

    def _backward(self, loss, mode, retain_graph=False):
        _check_no_grads(self._group_of, self._names)
        self._register_hooks(self._group_of)  # parameters unfrozen since the last step
        self._mode = mode
        try:
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward(retain_graph=retain_graph)
        finally:
            self._mode = None

    def grad_norm(self, loss):
        """Pass 1 of two: backward (graph retained) that only measures the global gradient
        L2 norm (unscaled, before value clipping). Returns it as a 0-d tensor; it is inf/nan
        if any gradient overflowed. The next fused_backward(loss) uses it."""
        self._sumsq = torch.zeros(2, device=loss.device, dtype=torch.float32)  # replicated, sharded
        self._backward(loss, "norm", retain_graph=True)
        self._pending_norm = self._norm_from_sumsq()
        return self._pending_norm

    def fused_backward(self, loss, lr=None):
        """Backward with every parameter updated (and its gradient freed) the moment its
        gradient is complete. `lr` overrides the param_groups lr for this step only.

        Clipping by global norm (clip_grad_norm=) and fp16 overflow checks need the norm
        before any update, so they cost one extra backward (grad_norm) unless the caller
        ran grad_norm(loss) already. Returns False if the step was skipped on overflow.
        Do not wrap the model in DDP: under torch.distributed each gradient is averaged
        across ranks inside the hook.

        With accumulation_steps=k each call is one micro-batch (pass it loss / k): the k-th
        call ends the optimizer step (step() ends one early); the step hooks fire around it.
        Clipping then takes a norm pass per micro-batch, each clipped to clip_grad_norm / k."""
        if lr is not None:
            _check_positive("lr", lr, allow_none=False, allow_zero=True)
        if self._micro + 1 < self.accumulation_steps:
            self._update_pass(loss, lr, last=False)
            self._micro += 1
            return True
        return self._fused_step(loss, lr)

    @torch.optim.Optimizer.profile_hook_step  # step pre/post hooks and the profiler, as around step()
    def _fused_step(self, loss, lr):
        if not self._update_pass(loss, lr, last=True):
            return False
        self._opt_called = True  # tells torch's lr schedulers that a step happened
        return True

    def _update_pass(self, loss, lr, last):
        """One micro-batch's (or the step's) backward with its update, after the norm pass that
        clipping or fp16's overflow check needs; last ends an accumulated step. False: skipped
        on an fp16 overflow."""
        norm, self._pending_norm = self._pending_norm, None
        if norm is None and (self.clip_grad_norm is not None or self.loss_scaler):
            norm, self._pending_norm = self.grad_norm(loss), None
        if self.loss_scaler and not torch.isfinite(norm).item():  # one sync per step, fp16 only
            self.loss_scaler.update(overflow=True)
            return False
        self._lr = lr
        self._clip_coef = self._clip_coef_from(norm, self.accumulation_steps) if norm is not None else None
        try:
            self._backward(loss, "update")
            if last and self.accumulation_steps > 1:
                self._end_window()
        finally:
            self._lr, self._clip_coef = None, None
        if self.loss_scaler:
            self.loss_scaler.update(overflow=False)
        return True

    # -- state (section 7 has the checks and the loading) ---------------------------------

    def add_param_group(self, param_group):
        """torch.optim's add_param_group; after construction the new parameters train like the
        others with both drivers (their hooks, geometry and names are set up; section 7)."""
        if not hasattr(self, "_group_of"):  # torch's __init__ adding the groups built above
            return super().add_param_group(param_group)
        _add_group(self, param_group)

    def state_bytes(self):
        """Bytes held as optimizer state (all tensors in self.state)."""
        return sum(t.numel() * t.element_size() for s in self.state.values()
                   for t in s.values() if torch.is_tensor(t))

    def state_dict(self):
        if self._micro:
            raise RuntimeError(
                f"state_dict() in the middle of an accumulated step ({self._micro} of {self.accumulation_steps} "
                "micro-batches used): the weights and state are part-way through it. Save after step() "
                "(or the step's last fused_backward).")
        sd = super().state_dict()
        sd["lowmem"] = {"loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler else None,
                        "generators": {k: g.get_state() for k, g in self._generators.items()},
                        "sr_calls": self._sr_calls}
        return sd

    def load_state_dict(self, state_dict):
        """Load state exactly (dtype kept: torch's loader would cast fp32 state to bf16); a step
        being accumulated is dropped. Takes sharded_state_dict()'s too. torch.optim's load hooks
        (register_load_state_dict_pre_hook / _post_hook) run around it, as in torch's."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        _load_state(self, state_dict)
        self._micro, self._window = 0, {}
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def sharded_state_dict(self):
        """state_dict() for torch.distributed.checkpoint under FSDP2, resumable on any number of
        ranks: state holding a parameter's rows is a DTensor sharded like it (section 6)."""
        return _sharded_state_dict(self)

    def _check_own_settings(self, settings, where):  # an optimizer's settings beyond lr and weight_decay
        pass

    def _new_state(self, p, x):  # a parameter's state before its first step (LOMO keeps none)
        return {}

    def _row_keys(self, p, x):  # which state tensors hold x's rows (dim 0), sharded like x
        return ()

    def _adopt_state(self, p, saved):  # AdamMini checks its m's format
        return saved

    def __getstate__(self):  # copy.deepcopy and pickle
        return _copyable_state(self)

    def __setstate__(self, state):
        _restore_copy(self, state)


# ----------------------------------------------------------------------------------------
# 4. The optimizers: arguments, lazy state, one call to the rule of section 1


class LOMO(_LowMemOptimizer):
    """p <- p * (1 - lr*wd) - lr * g (lomo_update). No optimizer state. `step()` is plain SGD."""

    def __init__(self, model_or_params, lr=1e-3, weight_decay=0.0, clip_grad_norm=None,
                 clip_grad_value=None, loss_scale=None, stochastic_rounding=False, seed=0,
                 update_in_backward=False, accumulation_steps=1):
        super().__init__(model_or_params, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm,
                         clip_grad_value, loss_scale, stochastic_rounding, seed, update_in_backward, accumulation_steps)

    def _update(self, p, w, g, group, state, lr):
        lomo_update(w, g, lr, group["weight_decay"])

    def _kernel_update(self, p, x, grad, prep, group, state, lr):
        return _lomo_kernel(self, p, x, grad, prep, group, lr)


class AdaLomo(_LowMemOptimizer):
    """Adafactor-style adaptive LOMO, without first moment (adalomo_update).

    Matrices (and the last two dims of >2-D tensors) keep row and column means of g^2;
    0-d and 1-D tensors keep a full v. The update is normalized by its RMS and scaled by
    the parameter's RMS (grouped update normalization). The step counter starts at 1 at
    the first update of each tensor, so no NaN can come from step 0 (an official defect)."""

    one_call_devices = ("cpu",)  # devices whose kernels do a whole update in one call (lm_adalomo)

    def __init__(self, model_or_params, lr=1e-3, eps=(1e-30, 1e-3), clip_threshold=1.0,
                 decay_rate=-0.8, weight_decay=0.0, clip_grad_norm=None, clip_grad_value=None,
                 loss_scale=None, stochastic_rounding=False, seed=0, update_in_backward=False, accumulation_steps=1):
        defaults = dict(lr=lr, eps=tuple(eps) if isinstance(eps, list) else eps, clip_threshold=clip_threshold,
                        decay_rate=decay_rate, weight_decay=weight_decay)
        super().__init__(model_or_params, defaults, clip_grad_norm, clip_grad_value, loss_scale,
                         stochastic_rounding, seed, update_in_backward, accumulation_steps)

    def _begin(self, g, state, advance=1):
        """Create state on first use, advance the step (unless not); returns (step, moments)."""
        if not state:
            state["step"] = 0
            f32 = dict(dtype=torch.float32, device=g.device)
            if g.dim() >= 2:
                state["row"], state["col"] = torch.zeros(g.shape[:-1], **f32), torch.zeros(g.shape[:-2] + g.shape[-1:], **f32)
            else:
                state["v"] = torch.zeros(g.shape, **f32)
        state["step"] += advance
        return state["step"], ((state["row"], state["col"]) if g.dim() >= 2 else (state["v"],))

    def _new_state(self, p, x):  # zero state at step 0 (section 6's checkpoints)
        state = {}
        self._begin(x, state, advance=0)
        return state

    def _check_own_settings(self, settings, where):
        _check_adalomo_settings(settings, where)

    def _row_keys(self, p, x):  # the state holding x's rows (dim 0): all but a matrix's column statistic
        return ("row", "col") if x.dim() >= 3 else ("row",) if x.dim() == 2 else ("v",) if x.dim() == 1 else ()

    def _update(self, p, w, g, group, state, lr):
        step, moments = self._begin(g, state)
        adalomo_update(w, g, moments, step, lr, group["eps"], group["clip_threshold"], group["decay_rate"],
                       group["weight_decay"], self._geo[p])

    def _kernel_update(self, p, x, grad, prep, group, state, lr):
        return _adalomo_kernel(self, p, x, grad, prep, group, state, lr)

    def _micro_batch(self, p, x, grad, prep, group, state, lr, first):
        """Accumulating k micro-batches: each is an AdaLomo step of its own at lr/k. AdaLomo
        keeps no sum of gradients, and its normalized update does not shrink with a
        micro-batch's gradient, so the lr takes the k-th share (RESULTS.md "Gradient accumulation")."""
        self._rule(p, x, grad, prep, group, state, lr / self.accumulation_steps)


class AdamMini(_LowMemOptimizer):
    """AdamW with one second-moment value per block (see `partition`; adam_mini_update).

    m = b1*m + (1-b1)*g;  v_b = b2*v_b + (1-b2)*mean_block(g*g)
    p = p*(1 - lr*wd) - lr * m_hat / (sqrt(v_hat_b) + eps)
    Weight decay is skipped on 1-D tensors (norms, biases). v is fp32; m is fp32 whatever the
    parameter dtype unless `state_dtype` says otherwise: torch.bfloat16 (2 bytes per parameter),
    or torch.int8 (1 byte: quantize_blocks, for tensors of 2 or more dims; vectors keep fp32 m).
    Either is written back by stochastic rounding (`m_rounding`; seeded, saved in state_dict)."""

    m_rounding = "stochastic"  # of a bf16 or 8-bit m, or "nearest" (RESULTS.md "Adam-mini's first moment in bf16 or 8 bits")

    def __init__(self, model_or_named_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, n_heads=None, n_kv_heads=None, head_dim=None,
                 clip_grad_norm=None, clip_grad_value=None, loss_scale=None,
                 stochastic_rounding=False, seed=0, state_dtype=torch.float32, update_in_backward=False,
                 accumulation_steps=1):
        _check_state_dtype(state_dtype)
        named, params = _named_params(model_or_named_params)
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            self.partition = partition(module, n_heads, n_kv_heads, head_dim)
            self._blocks, self._waiting = {p: b for (_, p), b in zip(named, self.partition)}, {}
        else:  # pairs: head_dim from all of them; a param group may give its own heads (another tower's)
            shared = _heads_of(None, named, {}, n_heads, n_kv_heads, head_dim)
            self._blocks, self._waiting = {}, {}  # _waiting: frozen parameters, cut when unfrozen
            for i, group in enumerate(params):
                own = _heads_of_group(group, None, f"param group {i}: ")
                blocks, waiting = _cut_pairs(group["params"], _heads_of(None, group["params"], {}, **own) if own else shared)
                self._blocks.update(blocks)
                self._waiting.update(waiting)
            self.partition = Partition(self._blocks.values())
        self.state_dtype = state_dtype
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, clip_grad_norm, clip_grad_value, loss_scale, stochastic_rounding,
                         seed, update_in_backward, accumulation_steps)
        heads = _Heads(module, n_heads, n_kv_heads, head_dim)  # for parameters added later
        self._head_args = dict(n_heads=heads.n_heads, n_kv_heads=heads.n_kv_heads, head_dim=heads.head_dim)
        self._starts = {}  # section 5: each blocked tensor's block offsets, for the kernel

    def add_param_group(self, param_group):
        """Blocks for the new parameters too: named by (name, parameter) pairs, with this
        optimizer's head counts, or the group's own n_heads / n_kv_heads / head_dim."""
        if not hasattr(self, "_group_of"):
            return super().add_param_group(param_group)
        param_group = dict(param_group, params=list(param_group["params"]))  # a generator is read once
        named, _ = _named_params([param_group])  # refuses parameters without names, as __init__ does
        heads = _heads_of_group(param_group, self._head_args, f"param group {len(self.param_groups)}: ")
        blocks, waiting = _cut_pairs(named, _heads_of(None, named, {}, **heads))  # may refuse: nothing changed yet
        super().add_param_group(param_group)
        self._blocks.update(blocks)
        self._waiting.update(waiting)
        self.partition.extend(blocks.values())

    def _register_hooks(self, params):
        """A parameter given frozen and unfrozen since gets its blocks first, cut as they would
        have been at construction (its name, the head geometry of its group)."""
        for p in [p for p in params if p.requires_grad and p in self._waiting]:
            name, heads = self._waiting[p]
            self._blocks[p] = _classify(name, p, None, heads)  # may refuse (no head count): before any update
            self.partition.append(self._blocks[p])
            del self._waiting[p]
        super()._register_hooks(params)

    def _m_dtype(self, x):
        """How m of a parameter whose data (or shard) is x is kept: 8 bits needs rows to scale by."""
        if self.state_dtype == torch.int8 and not (x.dim() >= 2 and math.prod(x.shape[1:]) > 0):
            return torch.float32
        return self.state_dtype

    def _begin(self, x, state, blocks, advance=True):
        """Create state on first use, advance the step (unless not); returns (step, m, v)."""
        if not state:
            state["step"] = 0
            state["m"] = torch.zeros_like(x, dtype=self._m_dtype(x))
            if state["m"].dtype == torch.int8:  # one scale per QBLOCK elements of each row
                state["m_scale"] = torch.zeros(x.shape[0], -(-math.prod(x.shape[1:]) // QBLOCK), device=x.device)
            v_shape = x.shape if blocks.kind == "element" else (blocks.n_v,)
            state["v"] = torch.zeros(v_shape, dtype=torch.float32, device=x.device)
        state["step"] += advance
        return state["step"], state["m"], state["v"]

    def _new_state(self, p, x):  # zero state at step 0 (section 6's checkpoints)
        state = {}
        self._begin(x, state, self._blocks[p], advance=False)
        return state

    def _check_own_settings(self, settings, where):
        _check_adam_mini_settings(settings, where)

    def _row_keys(self, p, x):  # the state holding x's rows (dim 0): all but the per-block v
        return ("m", "m_scale", "v") if self._blocks[p].kind == "element" else ("m", "m_scale")

    def _update(self, p, w, g, group, state, lr):
        blocks = self._blocks[p]
        t, m, v = self._begin(w, state, blocks)
        m32 = self._load_m(m, state)
        wd = group["weight_decay"] if blocks.decay else 0.0
        adam_mini_update(w, g, m32, v, blocks, t, lr, group["betas"], group["eps"], wd, self._geo[p])
        if m32 is not m:  # bf16 or 8-bit m: rounded back
            self._store_m(m, state.get("m_scale"), m32)

    def _micro_batch(self, p, x, grad, prep, group, state, lr, first):
        """Accumulating: the micro-batch's gradient folded into m and v (adam_mini_fold); the
        weights move once, when the step ends (_finish_step). The PyTorch rule, no kernel."""
        _, m, v = self._begin(x, state, self._blocks[p], advance=False)
        m32 = self._load_m(m, state)
        adam_mini_fold(_prepare_grad(grad, prep), m32, v, self._blocks[p], group["betas"], first, self._geo[p])
        if m32 is not m:
            self._store_m(m, state.get("m_scale"), m32)

    def _finish_step(self):
        """The weights of every parameter this step's micro-batches reached, from m and v."""
        for p, k in self._window.items():
            group, state, blocks = self._group_of[p], self.state[p], self._blocks[p]
            x = p.to_local() if self._geo[p].sharded else p
            t, m, v = self._begin(x, state, blocks)
            w = x.float() if x.dtype != torch.float32 else x
            wd = group["weight_decay"] if blocks.decay else 0.0
            lr = group["lr"] if self._lr is None else self._lr
            m32 = self._load_m(m, state)
            adam_mini_agreement(m32, v, blocks, t, group["betas"], k, self._geo[p])
            adam_mini_apply(w, m32, v, blocks, t, lr, group["betas"], group["eps"], wd, self._geo[p])
            if w is not x:
                self._write_back(x, w)

    def _load_m(self, m, state):
        """m in fp32 (m itself when it is fp32)."""
        return dequantize_blocks(m, state["m_scale"]) if m.dtype == torch.int8 else m.float()

    def _store_m(self, m, scales, m32):
        """m32 written back into m (bf16, or 8-bit codes and their scales), rounded as m_rounding says."""
        gen = self._generator(m.device) if self.m_rounding == "stochastic" else None
        if m.dtype == torch.int8:
            noise = torch.rand((*scales.shape, QBLOCK), generator=gen, device=m.device) if gen else None
            quantize_blocks(m32, m, scales, noise)
        else:
            m.copy_(_stochastic_round_bf16(m32, gen) if gen else m32)

    def _m_seed(self, m):
        """(stochastic?, seed) for a kernel's rounding of m; fp32 m is not rounded."""
        return (1, self._next_seed()) if m.dtype != torch.float32 and self.m_rounding == "stochastic" else (0, 0)

    def _adopt_state(self, p, saved):
        """load_state_dict: a saved m must be kept as this optimizer keeps it (no silent
        conversion to or from 8 bits); a v saved in bf16 (older checkpoints) is taken as fp32."""
        m, want = saved.get("m"), self._m_dtype(p.to_local() if self._geo[p].sharded else p)
        if torch.is_tensor(m) and m.dtype != want:
            raise ValueError(
                f"load_state_dict: parameter '{self._names[p]}' has its first moment m saved as {m.dtype}, but this "
                f"optimizer keeps it as {want} (state_dtype={self.state_dtype}): build it with the state_dtype "
                "the checkpoint was written with")
        return dict(saved, v=saved["v"].float()) if torch.is_tensor(saved.get("v")) else saved

    def _kernel_update(self, p, x, grad, prep, group, state, lr):
        return _adam_mini_kernel(self, p, x, grad, prep, group, state, lr)


# ----------------------------------------------------------------------------------------
# 5. The fused C / CUDA kernels (fused_ext.c), compiled on first use and loaded with cffi.
# The rules of section 1 are the reference; the kernels do the same math in one pass per
# tensor. LOWMEM_KERNELS=torch forces the reference, =c requires the kernels. Below: loading,
# the one argument check, the multi-tensor queue, then each optimizer's kernel path.

def _c_declarations(source):
    """What cffi needs to call fused_ext.c, read from the C source itself: its one-line struct
    typedefs, the prototype of every CPU entry point, and the lm_multi_* entries of its MULTI
    lines. Returns (the declarations, {whole-update kernel: the struct of its lm_multi_* items})."""
    try:
        with open(source) as f:
            text = f.read()
    except OSError:
        return "", {}
    typedefs = re.findall(r"^typedef struct \{[^}]*\} \w+;", text, re.M)
    functions = ["int " + " ".join(f.split()) + ";" for f in re.findall(r"^int (lm_\w+\([^)]*\))\s*\{", text, re.M)]
    multi = dict(re.findall(r"^MULTI\((\w+), (\w+),", text, re.M))
    functions += [f"int lm_multi_{name}(const {item} *items, int64_t count, int64_t *done, void *stream);"
                  for name, item in multi.items()]
    return "\n".join(typedefs + functions), {"lm_" + name: item for name, item in multi.items()}


_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_ext.c")
_CDEF, _MULTI = _c_declarations(_SOURCE)
# lm_adalomo (a whole AdaLomo update in one call) is CPU-only: CUDA runs the passes one by one.
_CUDA_KERNELS = sorted(set(re.findall(r"int (lm_\w+)\(", _CDEF)) - {"lm_adalomo", "lm_multi_adalomo"})
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_libs = {}  # "cpu" / "cuda" -> (ffi, lib) or None


def _cpu_id():
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({l for l in f if l.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _build_flags(cuda, gpu_archs=None):
    """Compiler flags for fused_ext.c. gpu_archs (e.g. ("80", "90")) replaces -arch=native,
    which needs a GPU: the tests compile the CUDA half that way on machines without one."""
    if not cuda:
        return ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c99"]
    arch = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in gpu_archs] if gpu_archs else ["-arch=native"]
    return ["-O3", "--fmad=false", "-x", "cu", *arch, "-shared", "-Xcompiler", "-fPIC"]


def _compile(cuda):
    """Build fused_ext.c into a cache keyed by source, flags and machine; None if impossible."""
    compiler = shutil.which("nvcc" if cuda else os.environ.get("CC", "cc"))
    if compiler is None or not os.path.exists(_SOURCE):
        return None, f"no {'nvcc' if cuda else 'C compiler'} or no fused_ext.c"
    flags = _build_flags(cuda)
    with open(_SOURCE, "rb") as f:  # -march=native: the key includes the CPU model and flags
        key = hashlib.sha256(f.read() + " ".join([compiler, *flags, platform.machine(), _cpu_id()]).encode())
    cache = os.environ.get("LOWMEM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lowmem"))
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, f"fused_ext_{'cuda_' if cuda else ''}{key.hexdigest()[:16]}.so")
    if not os.path.exists(target):  # build to a temp file, then rename: concurrent builds are safe
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([compiler, *flags, _SOURCE, "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            return None, f"build failed: {result.stderr.strip()[-500:]}"
        os.replace(tmp, target)
    return target, None


def _load(device_type):
    if device_type not in _libs:
        _libs[device_type], why = None, None
        mode = os.environ.get("LOWMEM_KERNELS", "auto")
        if mode not in ("auto", "c", "torch"):
            raise ValueError(f"LOWMEM_KERNELS must be auto, c or torch, got {mode!r}")
        if mode == "torch":
            why = "LOWMEM_KERNELS=torch"
        elif device_type not in ("cpu", "cuda"):
            why = f"no kernels for {device_type}"
        else:
            try:
                import cffi
                path, why = _compile(cuda=device_type == "cuda")
                if path:
                    _libs[device_type] = _open_build(path, cffi.FFI())
                if path and device_type in _CHECK_ON:  # section 5's self-check, cached with the build
                    device = torch.device(_CHECK_ON[device_type])
                    if device.type == "cuda" and device.index is None:  # this process's GPU (a torchrun rank's)
                        device = torch.device("cuda", torch.cuda.current_device())
                    failed = _verdict(path, device, _compile(cuda=False)[0])
                    if failed:
                        _libs[device_type], why = None, f"its kernels failed their self-check: {failed}"
            except ImportError:
                why = "cffi is not installed"
        if _libs[device_type] is None and mode == "c":
            raise RuntimeError(f"LOWMEM_KERNELS=c but the {device_type} kernels are unavailable: {why}")
        used = {"cpu": "C kernels (fused_ext.c, OpenMP)", "cuda": "CUDA kernels (fused_ext.c)"}
        print(f"lowmem: {device_type} updates use " + (used[device_type] if _libs[device_type]
              else f"the PyTorch reference path ({why})"), file=sys.stderr)
    return _libs[device_type]


def _open_build(path, ffi):
    """(ffi, library) of a build of fused_ext.c, declared to a new cffi.FFI() from the C source."""
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(path)


def kernels(device=None):
    """Which implementation updates tensors on `device`: "c", "cuda" or "torch"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if _load(device.type) is None:
        return "torch"
    return "cuda" if device.type == "cuda" else "c"


# -- the self-check: a CUDA build proves itself on this GPU and driver before it updates anything

_CHECK_ON = {"cuda": "cuda"}  # device type -> the device its build is checked on before use
_CHECK_SHAPES = [(), (1,), (300,), (1, 7), (7, 1), (33, 65), (2, 3, 4)]
_CHECK_NAMED = [("embed_tokens.weight", (11, 8)), ("layers.0.self_attn.q_proj.weight", (8, 8)),
                ("layers.0.self_attn.k_proj.weight", (4, 8)), ("layers.0.mlp.up_proj.weight", (6, 8)),
                ("layers.0.mlp.up_proj.bias", (300,)), ("layers.0.mlp.down_proj.bias", (1,)), ("norm.weight", (8,))]
_CHECK_OPTIMIZERS = {  # name -> (the (name, shape) of each weight, make an optimizer of (name, weight) pairs)
    "LOMO": ([("w", s) for s in _CHECK_SHAPES], lambda named, **kw: LOMO([p for _, p in named], lr=0.05, weight_decay=0.1, **kw)),
    "AdaLomo": ([("w", s) for s in _CHECK_SHAPES], lambda named, **kw: AdaLomo([p for _, p in named], lr=0.05, weight_decay=0.1, **kw)),
    **{f"AdamMini{m}": (_CHECK_NAMED, lambda named, dtype=dtype, **kw: AdamMini(
        named, lr=0.01, weight_decay=0.1, n_heads=4, n_kv_heads=2, head_dim=2, state_dtype=dtype, **kw))
       for m, dtype in (("", torch.float32), (" with a bf16 m", torch.bfloat16), (" with an 8-bit m", torch.int8))},
}
_CHECK_DTYPES = [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
                 (torch.bfloat16, torch.float32, False), (torch.float16, torch.float16, False),
                 (torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float32, True)]  # weight, gradient, SR
_CANARY, _FILL = 64, 1152.0  # elements either side of every checked weight, and their value (exact in bf16)


class _Recorder:
    """A kernel library that notes which of its entry points are called."""
    def __init__(self, lib):
        self.lib, self.used = lib, set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(self.lib, name)


@contextlib.contextmanager
def _kernels_for(device_type, lib):
    """Kernel calls for `device_type` tensors go to `lib` ((ffi, lib); None: the PyTorch rules);
    AdaLomo takes the one-call path only where the library has it (a CUDA build has not)."""
    saved, one_call = _libs.get(device_type, False), AdaLomo.one_call_devices
    _libs[device_type] = lib
    if lib is None or not hasattr(lib[1], "lm_multi_adalomo"):
        AdaLomo.one_call_devices = tuple(d for d in one_call if d != device_type)
    _multi_entry.cache_clear()
    try:
        yield
    finally:
        if saved is False:
            del _libs[device_type]
        else:
            _libs[device_type] = saved
        AdaLomo.one_call_devices = one_call
        _multi_entry.cache_clear()


def _check_run(opt_name, weights, dtypes, device, lib, side_stream=False):
    """Two steps of one optimizer on `weights` ((name, shape) pairs, each inside canaries) with
    the kernels of `lib` on `device` (lib None: the PyTorch rules); a run is a pure function of
    its arguments. With side_stream (CUDA), it runs on a side stream whose inputs are written
    after a sleep: a kernel launched on any other stream would read them before they are there.
    Returns (the weights' and their state's tensors, on the CPU; the kernels called; whether the
    canaries are intact)."""
    pdt, gdt, sr = dtypes
    gen, sources = torch.Generator().manual_seed(len(weights)), []
    for _, shape in weights:  # per weight: the canaried buffer, then two steps' gradients
        w = torch.full((math.prod(shape) + 2 * _CANARY,), _FILL)
        w[_CANARY:-_CANARY] = torch.randn(math.prod(shape), generator=gen)
        sources += [w.to(device, pdt)] + [(torch.randn(shape, generator=gen) * 2).to(device, gdt) for _ in range(2)]
    stream = torch.cuda.Stream(device) if side_stream else None
    recorder = lib and _Recorder(lib[1])
    with _kernels_for(device.type, recorder and (lib[0], recorder)), torch.no_grad(), \
            (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
        if recorder:
            recorder.used.clear()  # _kernels_for asked it for lm_multi_adalomo
        inputs = sources
        if stream:
            stream.wait_stream(torch.cuda.current_stream(device))
            inputs = [torch.zeros_like(t) for t in sources]
            torch.cuda._sleep(10_000_000)
            for t, source in zip(inputs, sources):
                t.copy_(source)
        bufs, grads = inputs[0::3], list(zip(inputs[1::3], inputs[2::3]))
        params = [nn.Parameter(buf[_CANARY:-_CANARY].view(shape)) for buf, (_, shape) in zip(bufs, weights)]
        opt = _CHECK_OPTIMIZERS[opt_name][1]([(name, p) for (name, _), p in zip(weights, params)],
                                             clip_grad_value=3.0, stochastic_rounding=sr, seed=5)
        opt.m_rounding = "stochastic" if sr else "nearest"  # an Adam-mini's bf16 or 8-bit m, as its weights
        for step in range(2):
            with _batched():  # every preparation: unscale, clip, norm coefficient
                for p, g in zip(params, grads):
                    opt._apply(p, g[step].view(p.shape), 2.0, None, 0.9)
        intact = all(bool((torch.cat([b[:_CANARY], b[-_CANARY:]]).float() == _FILL).all()) for b in bufs)
        tensors = [t.float().cpu() for p in params for t in [p.detach()] + [t for t in opt.state[p].values() if torch.is_tensor(t)]]
    return tensors, sorted(recorder.used) if recorder else [], intact


_ELEMENTWISE = {"lm_multi_sgd", "lm_multi_adam_elem"}  # kernels with no sum: the same bits in every build


def _self_check(device, lib, reference=None, log=None):
    """Every optimizer's kernel path with the build `lib` on small tensors on `device`: the edge
    shapes, every weight and gradient dtype, stochastic rounding on and off, every gradient
    preparation. Each run is compared with the same run on the CPU build `reference` (bit for
    bit where its kernels are element-wise, else within rounding) and with the PyTorch rules;
    its return codes and canaries are checked; on CUDA it is repeated on a side stream and must
    give the same bits. Returns None, or one line: what failed, where, the kernels that ran."""
    cpu = torch.device("cpu")
    for opt_name, (named, _) in _CHECK_OPTIMIZERS.items():
        for weights in [[w] for w in named] + [named]:  # each weight alone, then all in one multi-tensor step
            for dtypes in _CHECK_DTYPES:
                what = f"a {tuple(weights[0][1])}" if len(weights) == 1 else f"{len(weights)} weights at once, each a"
                case = f"{opt_name} on {what} {str(dtypes[0])[6:]} weight with {str(dtypes[1])[6:]} " \
                       f"gradients{', stochastic rounding' if dtypes[2] else ''}"
                if log:
                    log(case)
                used = []
                try:
                    got, used, intact = _check_run(opt_name, weights, dtypes, device, lib)
                    kernels = ", ".join(used)
                    if not intact:
                        return f"{case}: wrote outside the weight (kernels {kernels})"
                    refs = [("the CPU build", _check_run(opt_name, weights, dtypes, cpu, reference)[0],
                             set(used) <= _ELEMENTWISE)] if reference else []
                    if not dtypes[2]:  # the PyTorch rules round stochastically with other random bits
                        refs.append(("the PyTorch rules", _check_run(opt_name, weights, dtypes, cpu, None)[0], False))
                    if device.type == "cuda":
                        refs.append(("the same run on a side stream",
                                     _check_run(opt_name, weights, dtypes, device, lib, side_stream=True)[0], True))
                except Exception as e:  # a kernel's error code, or anything else the check runs into
                    return f"{case}: {type(e).__name__}: {e} (kernels {', '.join(used) or 'not yet known'})"
                for against, ref, bitwise in refs:
                    for a, b in zip(got, ref):
                        close = torch.equal(a, b) if bitwise else \
                            (a - b).abs().le(4 * torch.finfo(dtypes[0]).eps * b.abs() + 1e-6).all()
                        if not close:
                            return f"{case}: differs from {against} by up to {(a - b).abs().max().item():.3g} " \
                                   f"(kernels {kernels})"
    return None


def _device_id(device):
    """What a verdict holds for: the GPU and its architecture, the driver, torch and its CUDA."""
    if device.type != "cuda":
        return f"{device.type}, torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    driver = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else "unknown"
    return f"{props.name} sm_{props.major}{props.minor}, driver {driver}, torch {torch.__version__} CUDA {torch.version.cuda}"


def _verdict(path, device, reference):
    """None if the build at `path` passed the self-check on `device`, else why not. The first
    process to use a build on a GPU and driver runs the check in a child process (a device
    fault poisons the CUDA context of the process it happens in) and stores the verdict beside
    the build; later processes read it. Delete the .json file to check again."""
    ident = _device_id(device)
    record = f"{path}.check-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.json"
    if not os.path.exists(record):
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
        os.close(fd)
        code = "import sys; sys.path.insert(0, sys.argv[1]); import lowmem; lowmem._self_check_child(*sys.argv[2:])"
        args = [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), path, reference or "", str(device), tmp]
        try:
            child = subprocess.run(args, capture_output=True, text=True, timeout=900)
            died = child.returncode != 0 and f"exit code {child.returncode}: " + \
                " / ".join(child.stderr.strip().splitlines()[-2:])
        except subprocess.TimeoutExpired:
            died = "no verdict in 900 s"
        if died:
            with open(tmp, "w") as f:
                json.dump({"device": ident, "verdict": f"the self-check process died ({died})"}, f)
        os.replace(tmp, record)
    with open(record) as f:
        verdict = json.load(f)["verdict"]
    return verdict and f"{verdict} [verdict in {record}]"


def _self_check_child(path, reference, device, out):
    """The child process of _verdict: runs the check, writes {"device", "verdict"} to `out`."""
    import cffi
    device = torch.device(device)
    verdict = _self_check(device, _open_build(path, cffi.FFI()), _open_build(reference, cffi.FFI()) if reference else None,
                          log=lambda case: print(f"lowmem self-check: {case}", file=sys.stderr, flush=True))
    with open(out, "w") as f:
        json.dump({"device": _device_id(device), "verdict": verdict}, f)


_POINTER = {torch.float32: "float *", torch.int64: "int64_t *"}  # bf16/fp16 data: void *


def _is_dtensor(t):
    """A torch.distributed DTensor (FSDP2 shards, tensor parallel): never handed to a kernel."""
    return type(t) not in _PLAIN and any(c.__name__ == "DTensor" for c in type(t).__mro__)


_PLAIN = (torch.Tensor, nn.Parameter)  # the common case, answered without walking the MRO
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8)  # int8: an 8-bit m


def _check_kernel_args(like, tensors):
    """Refuse, before any memory is touched, what the kernels cannot handle."""
    for t in tensors:
        if type(t) in _PLAIN and t.layout == torch.strided and t.is_contiguous() and t.device == like.device \
                and t.dtype in _KERNEL_DTYPES:
            continue  # the common case, in one test
        if _is_dtensor(t) or t.layout != torch.strided:
            raise ValueError(f"fused kernel: a {type(t).__name__} with layout {t.layout} is not a plain dense tensor")
        if not t.is_contiguous():
            raise ValueError(f"fused kernel: tensor of shape {tuple(t.shape)} is not contiguous")
        if t.device != like.device:
            raise ValueError(f"fused kernel: tensor on {t.device}, expected {like.device}")
        if t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"fused kernel: dtype {t.dtype} is not fp32, bf16 or fp16")


def _c_arg(ffi, a):
    """A tensor is passed as a pointer to its data, None as NULL, a _CStruct as its C struct,
    a number as is."""
    if isinstance(a, torch.Tensor):
        return ffi.cast(_POINTER.get(a.dtype, "void *"), a.data_ptr())
    if a is None:
        return ffi.NULL
    if isinstance(a, _CStruct):
        return ffi.new(a.ctype + " *", a)[0]
    return a


def _call(like, name, *args):
    """Call kernel `name` on the library for `like`'s device, on torch's current stream."""
    _check_kernel_args(like, [a for a in args if isinstance(a, torch.Tensor)])
    ffi, lib = _libs[like.device.type]
    with _on(like.device):
        _check_err(name, getattr(lib, name)(*[_c_arg(ffi, a) for a in args], ffi.cast("void *", _stream(like.device))))


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _on(device):
    """CUDA kernels launch on the current device: make it the tensors' (with the model on cuda:1
    and cuda:0 current, device-1 pointers would otherwise be launched on device 0)."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        return torch.cuda.device(device)
    return _AS_IS


_AS_IS = contextlib.nullcontext()  # reusable: a kernel call off CUDA (every hook's) allocates no context


def _check_err(name, err):
    if err:
        raise RuntimeError(f"fused kernel {name} failed with error {err}")


def _launch(opt, key, name, x, grad, tensors, sizes, per_step):
    """Whole-update kernel `name` on one parameter, as name(x, xdt, grad, gdt, *tensors, *sizes,
    *per_step). The state tensors and sizes are the same from step to step: they are checked and
    turned into addresses once (opt._kernel_args[key]), and again only when one of them is
    replaced (loaded state); x and grad, which the caller has put through _kernel_ok, cost two
    addresses. Inside step() (_batched) the call is queued; elsewhere (a hook) it runs at once."""
    ids = tuple(map(id, tensors))
    cached = opt._kernel_args.get(key)
    if cached is None or cached[0] != ids or cached[1] != sizes:
        _check_kernel_args(x, [t for t in tensors if t is not None])
        addresses = tuple(0 if t is None else t.data_ptr() for t in tensors)
        cached = opt._kernel_args[key] = (ids, sizes, addresses + sizes, tensors)  # tensors kept: ids stay theirs
    device = x.device
    if grad.device != device:
        _check_kernel_args(x, [grad])  # raises, naming the device
    item = (x.data_ptr(), _DTYPE_CODE[x.dtype], grad.data_ptr(), _DTYPE_CODE[grad.dtype], *cached[2], *per_step)
    queue = getattr(_batch, "queue", None)
    if queue is None:
        _run_multi(device, name, [item], [(opt, key)])
    else:
        items, owners = queue.setdefault((device, name), ([], []))
        items.append(item)
        owners.append((opt, key))


def _run_multi(device, name, items, owners):
    """One lm_multi_* call (fused_ext.c) for a list of `name` calls' argument tuples; owners[i]
    is the (optimizer, parameter) of items[i]. No items: only check that the kernel can run.
    If a launch fails, the parameters it did not reach get their step counter back (each
    parameter's state stays that of its weights) and the error says how far it got."""
    kind = device.type
    ffi, function, array_type = _multi_entry(kind, name)
    stream = ffi.NULL if kind == "cpu" else ffi.cast("void *", _stream(device))
    done = ffi.new("int64_t *")
    with _on(device):
        err = function(ffi.new(array_type, items), len(items), done, stream)
    if err and not items:
        raise RuntimeError(f"fused kernel {name} cannot run here (error {err}): nothing was updated")
    if err:
        _not_stepped(owners[done[0]:])
        raise RuntimeError(f"fused kernel {name} failed with error {err}: it updated {done[0]} of {len(items)} "
                           "tensors; the others, and their step counters, are as before the step")


def _not_stepped(owners):
    """The updates of these (optimizer, parameter) pairs did not run: their step goes back."""
    for opt, p in owners:
        state = opt.state.get(p, {})
        if "step" in state:
            state["step"] -= 1


@functools.lru_cache(maxsize=None)
def _multi_entry(device_type, name):
    """(ffi, lm_multi_* function, its item array type) for a whole-update kernel, looked up once."""
    ffi, lib = _libs[device_type]
    return ffi, getattr(lib, "lm_multi" + name[2:]), ffi.typeof(_MULTI[name] + "[]")


_batch = threading.local()  # .queue inside _batched(): {(device, kernel name): ([calls' arguments], [their (opt, p)])}


@contextlib.contextmanager
def _batched():
    """The classic step(): each tensor's whole-update kernel call is queued, then all of a
    kernel's calls on a device go in one C call as an array of argument structs, so a tensor
    costs the host a tuple instead of a C call. The queued updates are independent (one
    parameter each). Every kernel of the step is checked before any runs, so one that cannot
    run here changes nothing; if the step fails, nothing queued runs and no step is counted."""
    _batch.queue = queue = {}
    started = 0  # calls started: a failed one has given back the steps of the items it did not reach
    try:
        yield
        for device, name in queue:
            _run_multi(device, name, [], [])
        for (device, name), (items, owners) in queue.items():
            started += 1
            _run_multi(device, name, items, owners)
    except BaseException:
        _not_stepped([o for _, owners in list(queue.values())[started:] for o in owners])
        raise
    finally:
        _batch.queue = None


def _kernel_ok(p, grad):
    """Tensors the kernels handle; others (fp64, non-contiguous) use the torch path."""
    if _load("cpu" if p.is_cpu else p.device.type) is None or grad.shape != p.shape:  # .device: 0.3 us
        return False
    for t in (p, grad):
        if t.dtype not in _DTYPE_CODE or _is_dtensor(t) or t.layout != torch.strided or not t.is_contiguous():
            return False
    return True



class _CStruct(tuple):
    """Scalars passed to a kernel as the C struct `ctype` (fused_ext.c), field by field."""
    ctype = None


class _Prep(_CStruct):
    """Gradient preparation, applied in this order: g*inv_scale, clamp(+-clip), *coef."""
    ctype = "prep_t"

    @functools.lru_cache(maxsize=64)  # the same for every tensor of a step
    def __new__(cls, inv_scale, clip, coef):
        return super().__new__(cls, (float(inv_scale), float(clip), float(coef)))


class _AdaLomoArgs(_CStruct):
    """(beta2_t, eps1, eps2, lr, weight_decay, clip_threshold): adalomo_t in fused_ext.c."""
    ctype = "adalomo_t"


class _Adam(_CStruct):
    """Adam hyper-parameters for one step of one tensor (matches adam_t in fused_ext.c)."""
    ctype = "adam_t"

    @functools.lru_cache(maxsize=64)  # every tensor of a step shares them: computed once
    def __new__(cls, lr, wd, b1, b2, t, eps):  # scalars in double, as the torch path does
        return super().__new__(cls, (1 - lr * wd, lr / (1 - b1 ** t), 1 - b1, b2, 1 - b2,
                                     math.sqrt(1 - b2 ** t), eps))


def _grad_sumsq(grad, scale):
    """Squared L2 norm of grad/scale as a 0-d fp32 device tensor (no host sync)."""
    if _kernel_ok(grad, grad):
        out = torch.zeros(1, dtype=torch.float32, device=grad.device)
        _call(grad, "lm_sumsq", grad, _DTYPE_CODE[grad.dtype], grad.numel(), 1.0 / scale, out)
        return out[0]
    return (grad.float() / scale).square().sum()


def _lomo_kernel(opt, p, x, grad, prep, group, lr):  # elementwise: shards need nothing more
    _launch(opt, p, "lm_sgd", x, grad, (), (x.numel(),), (prep, lr, 1 - lr * group["weight_decay"], *opt._sr_seed(x)))
    return True


def _adalomo_kernel(opt, p, x, grad, prep, group, state, lr):
    """adalomo_update in three streaming passes: (1) the second-moment statistics, (2) the
    update's squared norm, (3) apply. On the CPU the three are one C call (lm_adalomo: a call
    costs more than a small tensor's passes). Nothing waits for the device. Under FSDP2 the
    statistics between the passes are summed over the ranks, so every rank runs them, even on
    an empty shard."""
    step, moments = opt._begin(grad, state)
    geo, beta2t = opt._geo[p], adalomo_beta2(step, group["decay_rate"])
    if x.numel() == 0 and not geo.sharded:
        return True
    if x.device.type in opt.one_call_devices and not geo.sharded:
        rows, cols = grad.shape[-2:] if grad.dim() >= 2 else (x.numel(), 1)
        h = _AdaLomoArgs((beta2t, *group["eps"], lr, group["weight_decay"], group["clip_threshold"]))
        _launch(opt, p, "lm_adalomo", x, grad, moments if len(moments) == 2 else (moments[0], None), (x.numel() // (rows * cols), rows, cols),
                (prep, h, *opt._sr_seed(x)))
    else:
        _adalomo_passes(opt, p, x, grad, prep, group, moments, lr, beta2t, geo)
    return True


def _adalomo_passes(opt, p, x, grad, prep, group, moments, lr, beta2t, geo):
    """GPU: four kernel calls per matrix (g^2 summed by row and by column; the factors; the
    update's and the weights' squares in one pass; the apply, which takes its step sizes from
    those squares on the device) into a workspace kept per parameter: no torch op, no
    allocation, no host sync. The CPU build has the same kernels, so the tests run this path
    there too (one_call_devices=()). A 1-D or 0-d tensor (small) keeps its v update in torch.
    Under FSDP2 the factors are the rule's adalomo_factors (sums over the ranks) and the squares
    are summed over the ranks before the apply: two collectives per matrix, one per vector."""
    (eps1, eps2), n, f32 = group["eps"], x.numel(), dict(dtype=torch.float32, device=x.device)
    call = (lambda *args: _call(x, *args)) if n else (lambda *args: None)  # empty shard: no kernel
    rows, cols = grad.shape[-2:] if grad.dim() >= 2 else (n, 1)
    batch = n // (rows * cols) if rows * cols else 1
    if (p, "workspace") not in opt._kernel_args:  # kept with the kernel-argument cache (section 5)
        opt._kernel_args[p, "workspace"] = torch.zeros(batch * (rows + cols) + 2 if grad.dim() >= 2 else 2, **f32)
    workspace = opt._kernel_args[p, "workspace"]
    if grad.dim() >= 2:
        (row, col), (r, c, sums) = moments, workspace.split([batch * rows, batch * cols, 2])
        call("lm_rowcol_sumsq", grad, _DTYPE_CODE[grad.dtype], batch, rows, cols, prep, eps1, r, c)  # sums of g^2
        if geo.sharded:
            r, c = (f.reshape(-1) for f in adalomo_factors(row, col, r.view(row.shape), c.view(col.shape), beta2t, geo))
        else:
            call("lm_adalomo_factors", row, col, batch, rows, cols, beta2t, r, c)  # the sums become r and c
    else:
        grad, sums = _prepare_grad(grad, prep).contiguous(), workspace
        prep = _Prep(1, 0, 1)
        r, c = ema_(moments[0], grad * grad + eps1, beta2t).rsqrt().reshape(-1), torch.ones(1, **f32)
    gdt, pdt = _DTYPE_CODE[grad.dtype], _DTYPE_CODE[x.dtype]
    if n:
        call("lm_factored_sumsq", grad, gdt, x, pdt, batch, rows, cols, prep, r, c, sums)
    else:
        sums.zero_()
    sums = geo.total(sums)  # the update's and the weights' squares, over the ranks
    h = _AdaLomoArgs((beta2t, eps1, eps2, lr, group["weight_decay"], group["clip_threshold"]))
    call("lm_factored_apply", x, pdt, grad, gdt, batch, rows, cols, prep, r, c, sums, geo.numel, h, *opt._sr_seed(x))


_M_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 3}  # Adam-mini's m (fused_ext.c struct moment)


def _adam_mini_kernel(opt, p, x, grad, prep, group, state, lr):
    """adam_mini_update in one pass: each block's mean g^2, v and update while the block is in
    cache, m read from and written back to its fp32, bf16 or 8-bit form on the way. HF Conv1D's
    column blocks (and transposed experts') are not contiguous, a sharded norm weight is one
    block across ranks, and experts' rows are not dim 0's, which a sharded tensor and an 8-bit
    m (scaled in runs along dim 0's rows) need: those take the PyTorch rule."""
    blocks, geo = opt._blocks[p], opt._geo[p]
    dims = row_dims(blocks) if blocks.segments else (0,)
    if dims not in ((0,), (0, 1)) or (geo.sharded and (blocks.kind == "tensor" or dims != (0,))) or \
            (opt._m_dtype(x) == torch.int8 and (blocks.kind == "element" or dims != (0,))):
        return False
    t, m, v = opt._begin(x, state, blocks)
    wd = group["weight_decay"] if blocks.decay else 0.0
    h, mdt = _Adam(lr, wd, *group["betas"], t, group["eps"]), _M_CODE[m.dtype]
    if blocks.kind == "element":
        _launch(opt, p, "lm_adam_elem", x, grad, (m, v), (x.numel(), mdt), (prep, h, *opt._sr_seed(x), *opt._m_seed(m)))
    elif geo.sharded:
        _adam_mini_sharded_rows(opt, x, grad, prep, state, h, group["betas"][1], blocks, geo)
    else:
        starts, n = _block_starts(opt, p, x, blocks)
        _launch(opt, p, "lm_adam_blocks", x, grad, (m, state.get("m_scale"), v, starts),
                (blocks.n_v, n, mdt, math.prod(x.shape[1:])), (prep, h, *opt._sr_seed(x), *opt._m_seed(m)))
    return True


def _adam_mini_sharded_rows(opt, x, grad, prep, state, h, b2, blocks, geo):
    """FSDP2: a block (an attention head) can straddle two ranks, so the one-pass kernel cannot
    take its mean: one kernel sums g^2 over each of this rank's rows, the block means are
    summed over the ranks (one collective, block_means) and v updated in torch (tiny vectors),
    then one kernel applies each row's v. An empty shard runs the collective and no kernel."""
    rows, pdt, gdt, m, v = geo.rows, _DTYPE_CODE[x.dtype], _DTYPE_CODE[grad.dtype], state["m"], state["v"]
    cols = x.numel() // rows if rows else 0
    row_sums = torch.zeros(rows, dtype=torch.float32, device=x.device)
    if x.numel():
        _call(x, "lm_row_sumsq", grad, gdt, rows, cols, prep, 0.0, row_sums)
    ema_(v, block_means(row_sums, blocks, geo), b2)
    if x.numel():
        row_v = expand_blocks(v, blocks, x.shape, geo).reshape(-1)
        _call(x, "lm_adam_rows", x, pdt, grad, gdt, m, state.get("m_scale"), row_v, rows, cols, _M_CODE[m.dtype], prep, h,
              *opt._sr_seed(x), *opt._m_seed(m))


def _block_starts(opt, p, x, blocks):
    """Element offsets of the blocks (each a contiguous run of output rows) and the elements
    they cover, cached."""
    if p not in opt._starts:
        dims = row_dims(blocks) if blocks.segments else ()  # () for one block: the whole tensor
        row_len = x.numel() // max(math.prod(x.shape[d] for d in dims), 1)
        segments = blocks.segments or ((0, 1, 1),)
        offsets = [a + i * k for a, b, k in segments for i in range((b - a) // k)] + [segments[-1][1]]
        opt._starts[p] = (torch.tensor(offsets, dtype=torch.int64, device=x.device) * row_len,
                          (offsets[-1] - offsets[0]) * row_len)
    return opt._starts[p]


# ----------------------------------------------------------------------------------------
# 6. Sharded parameters (FSDP2's fully_shard): each rank holds a block of rows (dim 0) of every
# parameter and updates only that block. Elementwise rules need nothing more; statistics over
# the whole tensor (an RMS, AdaLomo's column means, an Adam-mini block that straddles two
# ranks) are summed over the ranks: Shard.total, where the rules' default Whole has the identity.


class Shard(Whole):
    """A tensor's geometry under FSDP2: its whole shape, and the rows row0:row0+rows that this
    rank holds. The sums of section 1 are all-reduced over the rank's FSDP2 mesh."""
    sharded = True

    def __init__(self, p, name):
        super().__init__(p.shape)
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
            raise TypeError(
                f"parameter '{name}' is a DTensor with placements {placements} on a {mesh.ndim}-D mesh: "
                "lowmem updates FSDP2 parameters (fully_shard: Shard(0) on a 1-D mesh), built after "
                "sharding. Tensor parallel layouts would need statistics lowmem cannot reduce exactly.")
        # The mesh, not its process group: a reference to the group would keep gloo's threads
        # alive past destroy_process_group() into interpreter shutdown, where they abort.
        self.mesh, rank, world = mesh, mesh.get_local_rank(), mesh.size()
        self.name, self.placements = name, placements
        chunk = -(-self.shape[0] // world)  # torch.chunk's split, which FSDP2 uses
        self.row0 = min(rank * chunk, self.shape[0])
        self.rows = p.to_local().shape[0] if p.dim() else 1
        if self.rows != max(0, min(chunk, self.shape[0] - self.row0)):
            raise TypeError(f"parameter '{name}': unexpected FSDP2 shard of {self.rows} rows at row {self.row0}")

    def total(self, x):
        dist.all_reduce(x, group=self.mesh.get_group())  # in place
        return x

    def grad_rows(self, grad):
        """This rank's rows of the whole gradient: FSDP2 gives a DTensor laid out as the parameter.
        A gradient laid out otherwise (a DTensor sharded by hand, run through other ops) is refused."""
        if tuple(grad.placements) != self.placements:
            raise TypeError(f"parameter '{self.name}': its gradient is laid out as {tuple(grad.placements)}, "
                            f"the parameter as {self.placements}; lowmem updates each rank's rows with its "
                            "rows of the whole gradient, as FSDP2 gives them")
        return grad.to_local()

    def totals_over_rows(self, *sums):
        """Only 2-D tensors have their rows split (FSDP2 shards dim 0; for >2-D tensors that is a
        batch dim, each rank's slices are whole)."""
        if len(self.shape) != 2:
            return sums
        flat = self.total(torch.cat([x.reshape(-1) for x in sums]))
        return tuple(part.view(x.shape) for part, x in zip(flat.split([x.numel() for x in sums]), sums))

    def my_rows(self, x):
        return x[self.row0:self.row0 + self.rows]

    def place_rows(self, x):
        whole = x.new_zeros(self.shape[0], *x.shape[1:])
        whole[self.row0:self.row0 + self.rows] = x
        return whole


# Checkpoints on another number of ranks (torch.distributed.checkpoint, DCP). A rank holds
# its rows of m, of Adam-mini's 8-bit scales and of AdaLomo's row statistic, as of its
# parameter; sharded_state_dict() gives those as DTensors placed like the parameter, so DCP
# saves each row once and reads back the rows each rank of the new run holds. The rest is the
# same on every rank and saved once: Adam-mini's v (one value per block, kept whole on every
# rank; its block sums are all-reduced), AdaLomo's column statistic of a matrix (a mean over
# all rows), the step counts. Every trainable parameter appears, with zero state at step 0 if
# it has none yet, so that a fresh optimizer's sharded_state_dict() is the template DCP loads into.


def _sharded_state_dict(opt):
    opt._register_hooks(opt._group_of)  # a parameter unfrozen since the last step: its blocks (Adam-mini)
    sd = opt.state_dict()
    old, sd["state"] = sd["state"], {}  # str keys: DCP writes what it loads under str keys
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        for p, i in zip(group["params"], saved["params"]):
            if i not in old and not p.requires_grad:  # frozen: no state to save or to load
                continue
            x = p.to_local() if opt._geo[p].sharded else p
            state = sd["state"][str(i)] = dict(old.get(i) or opt._new_state(p, x))  # a copy: opt.state stays
            if opt._geo[p].sharded:
                for key in opt._row_keys(p, x):
                    if torch.is_tensor(state.get(key)):
                        state[key] = _rows_as_dtensor(state[key], p)
    return sd


def _rows_as_dtensor(t, p):
    """This rank's rows of a state tensor t as a DTensor placed like its FSDP2 parameter p
    (Shard(0) of torch.chunk's split, the last rank's rows fewer or none)."""
    from torch.distributed.tensor import DTensor
    shape = (p.shape[0], *t.shape[1:])
    stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _geometries(params, names):
    """({parameter: Whole or Shard}, the FSDP2 mesh or None): FSDP2's DTensor parameters are Shards,
    whether the optimizer was given the model, its parameters or param groups of them. Any DTensor
    held as rows (Shard(0) on a 1-D mesh) gets its rows of the whole gradient in its hook, which
    is all the rules need; other layouts are refused by name."""
    geos = {p: Shard(p, names[p]) if _is_dtensor(p) else Whole(p.shape) for p in params}
    meshes = {geo.mesh for geo in geos.values() if geo.sharded}
    if len(meshes) > 1:
        raise TypeError("parameters are sharded over different FSDP2 meshes; lowmem needs one")
    return geos, (meshes.pop() if meshes else None)


def _is_fsdp_module(module):
    """A module that FSDP2's fully_shard wrapped (by class name: no torch.distributed import)."""
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


# ----------------------------------------------------------------------------------------
# 7. Validation (every check runs before any parameter, state or file is touched) and
# checkpoints (state_dict/load_state_dict: exact resume)


def _check_positive(name, value, allow_none=True, allow_zero=False):
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _param_groups(model_or_params, first=0):
    """(param groups, {param: name}) from a module, params, (name, param) pairs, or param groups
    of either (numbered from `first`). Names given as pairs are kept as torch's optimizers keep
    them ("param_names")."""
    if isinstance(model_or_params, nn.Module):
        items = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
        groups = [{"params": [p for _, p in items]}]
        return groups, {p: n for n, p in items}
    if isinstance(model_or_params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or an nn.Module, got a single tensor")
    items, names = list(model_or_params), {}
    groups = [dict(g) for g in items] if items and isinstance(items[0], dict) else [{"params": items}]
    for gi, group in enumerate(groups):
        params = list(group["params"])
        if any(isinstance(x, tuple) for x in params):
            if not all(isinstance(x, tuple) and len(x) == 2 for x in params):
                raise ValueError(f"param group {gi}: give every parameter as a (name, parameter) pair, or none")
            group["param_names"], params = [n for n, _ in params], [p for _, p in params]
            names.update(zip(params, group["param_names"]))
        group["params"] = params
        for pi, p in enumerate(params):
            names.setdefault(p, f"param_groups[{first + gi}][{pi}]")
    if len({"param_names" in g for g in groups}) > 1:
        raise ValueError("either every param group gives (name, parameter) pairs or none does")
    return groups, names


def _named_params(model_or_named_params):
    """AdamMini's input as ((name, parameter) pairs, what the driver is built from): a module
    (its trainable parameters), or named_parameters(), (name, parameter) pairs or param groups of
    such pairs (all of them, frozen ones too, as torch's optimizers keep them: one unfrozen later trains)."""
    if isinstance(model_or_named_params, nn.Module):
        return [(n, p) for n, p in model_or_named_params.named_parameters() if p.requires_grad], model_or_named_params
    items = list(model_or_named_params)  # named_parameters() is a generator: read it once
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    pairs = [x for g in groups for x in g["params"]]
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in pairs):
        raise TypeError("AdamMini needs each parameter's name to find its blocks (heads, embeddings): pass "
                        "the model, model.named_parameters(), (name, parameter) pairs, or param groups of them")
    for name, p in pairs:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"optimizer can only optimize tensors, got {type(p).__name__} for '{name}'")
    groups = [dict(g, params=list(g["params"])) for g in groups]
    return [x for g in groups for x in g["params"]], groups


def _check_driver_args(groups, names, clip_grad_norm, clip_grad_value, loss_scale, update_in_backward,
                       accumulation_steps):
    """The shared driver's arguments and parameters; returns the parameters."""
    params = _check_params(groups, names)
    _check_positive("clip_grad_norm", clip_grad_norm)
    _check_positive("clip_grad_value", clip_grad_value)
    _check_positive("loss_scale", loss_scale)
    fp16 = any(p.dtype == torch.float16 for p in params)
    if update_in_backward:
        _check_update_in_backward(clip_grad_norm, loss_scale, fp16)
    _check_accumulation(accumulation_steps, clip_grad_norm, clip_grad_value, fp16 and loss_scale is None)
    return params


def _check_accumulation(k, clip_grad_norm, clip_grad_value, dynamic_loss_scale):
    """What accumulating micro-batches in a fused driver cannot give, refused up front: the
    first micro-batch's gradient is used (and freed) before the next one exists."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"accumulation_steps must be a positive integer (micro-batches per optimizer step), got {k!r}")
    if k == 1:
        return
    if clip_grad_value is not None:
        raise ValueError(
            f"accumulation_steps={k} cannot clip by value (clip_grad_value=): it acts on the accumulated "
            "gradient's elements, which a fused driver never holds; each micro-batch's gradient is used in "
            "its own backward, before the next exists. Use clip_grad_norm= (fused_backward clips each "
            "micro-batch to clip_grad_norm / k, so their sum stays within it), or the classic driver "
            "(loss.backward() per micro-batch, then step()), which clips the sum.")
    if dynamic_loss_scale:
        raise ValueError(
            f"accumulation_steps={k} cannot use fp16's dynamic loss scaler: an overflow in a late "
            "micro-batch would have to undo the earlier ones, already used. Give a static loss_scale=, "
            "or use bf16 parameters.")


def _check_params(groups, names):
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"optimizer can only optimize tensors, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"parameter '{names[p]}' has dtype {p.dtype}; only floating point "
                            "parameters can be optimized")
        if p.is_sparse:
            raise TypeError(f"parameter '{names[p]}' is sparse; lowmem supports dense parameters only")
    return params


def _add_group(opt, param_group):
    """add_param_group after construction, checked whole before anything changes: the new
    parameters get names, geometry, their group and a gradient hook."""
    (group,), names = _param_groups([param_group], first=len(opt.param_groups))
    params = _check_params([group], names)
    _check_settings(opt, opt.defaults, [group], first=len(opt.param_groups))
    for p in params:
        if p in opt._group_of:
            raise ValueError(f"add_param_group: parameter '{opt._names[p]}' is already in a param group")
        if _is_dtensor(p) and (opt._shard_mesh is None or p.device_mesh != opt._shard_mesh):
            raise TypeError(f"add_param_group: parameter '{names[p]}' is sharded on another mesh than this "
                            "optimizer's FSDP2 parameters (or they are not sharded)")
    geos = {p: Shard(p, names[p]) if _is_dtensor(p) else Whole(p.shape) for p in params}
    if "param_names" in opt.param_groups[0]:  # torch wants every group named or none
        group["param_names"] = [names[p] for p in params]
    else:
        group.pop("param_names", None)
    torch.optim.Optimizer.add_param_group(opt, group)  # torch's checks and defaults
    opt._names.update(names)
    opt._geo.update(geos)
    opt._group_of.update((p, opt.param_groups[-1]) for p in params)
    opt._register_hooks(params)
    for device_type in {p.device.type for p in params}:
        _load(device_type)


def _check_update_in_backward(clip_grad_norm, loss_scale, fp16):
    """What the caller's own loss.backward() cannot give the fused update, refused up front."""
    if clip_grad_norm is not None:
        raise ValueError(
            "update_in_backward=True cannot clip by global norm: the norm must be known before the "
            "first parameter is updated, and only fused_backward's two passes know it. Use "
            "opt.fused_backward(loss) with clip_grad_norm=, or clip_grad_value= here (AdaLomo's "
            "update normalization already bounds each step).")
    if fp16 or loss_scale is not None:
        raise ValueError(
            "update_in_backward=True cannot scale the loss: the caller runs loss.backward() itself, "
            "so neither fp16's dynamic loss scaler nor loss_scale= can act before it. Use bf16 or "
            "fp32 parameters, or opt.fused_backward(loss), which scales and unscales for you.")


def _check_settings(opt, defaults, groups, first=0):
    """The settings the rules read from a param group: the defaults, then each group's own over
    them, a bad one named with its group ("param group 1: lr must be ..."): lr and weight_decay,
    then the optimizer's own (_check_own_settings)."""
    named = [(f"param group {first + i}: ", {**defaults, **g}) for i, g in enumerate(groups)]
    for where, settings in [("", defaults)] + named:
        _check_positive(where + "lr", settings["lr"], allow_none=False, allow_zero=True)
        _check_positive(where + "weight_decay", settings["weight_decay"], allow_none=False, allow_zero=True)
        opt._check_own_settings(settings, where)


def _pair(x):
    return isinstance(x, (tuple, list)) and len(x) == 2


def _check_adalomo_settings(s, where=""):
    eps, decay_rate = s["eps"], s["decay_rate"]
    if not _pair(eps) or any(not isinstance(e, (int, float)) or not e > 0 for e in eps):
        raise ValueError(f"{where}eps must be two positive numbers (eps1, eps2), got {eps!r}")
    _check_positive(where + "clip_threshold", s["clip_threshold"], allow_none=False)
    if not isinstance(decay_rate, (int, float)) or not decay_rate < 0:
        raise ValueError(f"{where}decay_rate must be negative (beta2_t = 1 - t**decay_rate), got {decay_rate!r}")


def _check_adam_mini_settings(s, where=""):
    betas = s["betas"]
    if not _pair(betas) or any(not isinstance(b, (int, float)) or not 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")
    _check_positive(where + "eps", s["eps"], allow_none=False)


def _heads_of_group(group, heads, where):
    """The head counts an AdamMini param group's tensors are partitioned with: the group's own
    when it gives any of n_heads, n_kv_heads, head_dim (the others then come from its tensors),
    else `heads`, the optimizer's."""
    own = {k: group[k] for k in ("n_heads", "n_kv_heads", "head_dim") if k in group}
    for key, value in own.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}{key} must be a positive integer, got {value!r}")
    return dict(dict.fromkeys(("n_heads", "n_kv_heads", "head_dim")), **own) if own else heads


def _check_state_dtype(state_dtype):
    if state_dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise TypeError(f"state_dtype (Adam-mini's first moment m) must be torch.float32, torch.bfloat16 or "
                        f"torch.int8 (8 bits, in blocks), got {state_dtype}")


def _check_no_grads(params, names):
    for p in params:
        if p.grad is not None:
            raise ValueError(
                f"fused_backward: parameter '{names[p]}' already holds a .grad. The "
                "fused driver applies each gradient inside backward and frees it, so a "
                ".grad left by another backward would be lost. Call "
                "opt.zero_grad(set_to_none=True) first; to accumulate micro-batches, build "
                "the optimizer with accumulation_steps=k and call fused_backward(loss / k) for each.")


def _copyable_state(opt):
    """What a copy or a pickle of the optimizer holds: everything but the gradient hooks (the
    copy registers its own, on its parameters) and the kernel-argument cache (addresses of the
    original's state). Like torch's optimizers, the step hooks are not copied."""
    if opt._shard_mesh is not None:
        raise TypeError("an optimizer of FSDP2-sharded parameters cannot be copied or pickled (its "
                        "mesh belongs to a process group): save opt.state_dict() instead")
    return {k: v for k, v in vars(opt).items() if k != "_kernel_args" and not k.endswith("_hooks")}


def _restore_copy(opt, state):
    torch.optim.Optimizer.__setstate__(opt, state)  # torch's: empty step hooks, the step() wrapper
    opt._kernel_args = {}
    opt._hooks, opt._hooked = [], set()
    opt._register_hooks(opt._group_of)


def _load_state(opt, state_dict):
    """load_state_dict: state kept in its saved dtype, on each parameter's device."""
    saved = state_dict["param_groups"]
    if len(saved) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, opt.param_groups)):
        raise ValueError("load_state_dict: the saved parameter groups do not match this "
                         "optimizer's (different number of groups or parameters)")
    by_id = {str(i): p for s, g in zip(saved, opt.param_groups) for i, p in zip(s["params"], g["params"])}
    new_state = defaultdict(dict)
    for i, s in state_dict["state"].items():
        if s.get("step") == 0:  # sharded_state_dict()'s zero state of a parameter not yet stepped
            continue
        p = by_id[str(i)]
        s = {k: v.to_local() if _is_dtensor(v) else v for k, v in s.items()}  # this rank's rows
        new_state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                        for k, v in opt._adopt_state(p, s).items()}
    opt.state = new_state
    opt._kernel_args.clear()  # the replaced state's addresses (and the tensors they keep alive)
    for s, g in zip(saved, opt.param_groups):
        g.update({k: v for k, v in s.items() if k != "params"})
    extra = state_dict.get("lowmem", {})
    if opt.loss_scaler and extra.get("loss_scaler"):
        opt.loss_scaler.load_state_dict(extra["loss_scaler"])
    opt._sr_calls = extra.get("sr_calls", 0)
    for key, rng in extra.get("generators", {}).items():
        opt._generator(torch.device(key)).set_state(rng.cpu() if torch.is_tensor(rng) else rng)


if __name__ == "__main__":  # python lowmem.py: a tour of a few seconds on a toy language model
    import time
    torch.manual_seed(0)
    vocab, dim, heads = 64, 64, 4
    text = torch.arange(4096) * 7 % vocab  # a deterministic sequence to memorize

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.lm_head = nn.Linear(dim, vocab, bias=False)

        def forward(self, idx):
            x = self.embed(idx)
            mask = nn.Transformer.generate_square_subsequent_mask(idx.size(1))
            x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
            return self.lm_head(self.mlp(self.norm(x)) + x)

    print(partition(Toy()), "\n")
    for name, make, lr in [("LOMO", LOMO, 0.5), ("AdaLomo", AdaLomo, 1e-2), ("AdamMini", AdamMini, 3e-3)]:
        for fused in (False, True):
            torch.manual_seed(0)
            model = Toy()
            opt, t0, losses = make(model, lr=lr), time.time(), []
            for it in range(100):
                i = torch.randint(0, len(text) - 33, (16,))
                batch = torch.stack([text[j:j + 33] for j in i])
                logits = model(batch[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
                losses.append(loss.item())
                if fused:
                    opt.fused_backward(loss)
                else:
                    loss.backward(), opt.step(), opt.zero_grad(set_to_none=True)
            print(f"{name:9s} {'fused  ' if fused else 'classic'} loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                  f"  state {opt.state_bytes() / 1024:6.1f} KiB  {time.time() - t0:.1f}s")
