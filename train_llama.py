"""Full-parameter fine-tuning of LLaMA checkpoints with AdaLomo, LOMO, Adam-mini or AdamW.

    python train_llama.py                     # offline smoke run: pre-train a tiny LLaMA on Python's
                                              # docs, fine-tune it on stdlib Q&A, show before/after
    python train_llama.py --init_from=path/to/Llama-3.2-1B --data=train.jsonl --dtype=bfloat16
    torchrun --nproc_per_node=8 train_llama.py --init_from=... --data=...

The model uses Hugging Face's parameter names (model.layers.N.self_attn.q_proj.weight, ...),
so a checkpoint directory loads as is and `save_pretrained` writes one transformers loads.
Config, the training loop, checkpoints and torchrun handling are shared with train_gpt2.py.
"""
import ast
import glob
import json
import math
import os
import shutil
import sysconfig
import zlib
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

import train_gpt2 as common

# ----------------------------------------------------------------------------------------
# config: plain globals, overridden by a config file and --key=value
out_dir = None  # None: out-llama-{optimizer}
init_from = "scratch"  # scratch (offline demo) | resume | a Hugging Face LLaMA directory
overwrite = False  # let a new run replace a checkpoint that another configuration wrote to out_dir
data = "stdlib"  # stdlib (Q&A pairs from the standard library's docstrings) | a JSONL file
val_data = ""  # JSONL for the val loss; '' holds out every 10th example of data
mc_eval = ""  # JSONL {"prompt", "choices", "label"} scored by mean log-likelihood (LOMO paper)
save_dir = ""  # where the fine-tuned model is written as a HF directory ('' : out_dir/hf)
max_length = 192  # tokens per example; longer ones are truncated (and counted)
pretrain_iters = 400  # scratch only: byte-level LM pre-training before fine-tuning
# model, scratch only (a real checkpoint brings its own config.json)
hidden_size = 128  # model width
intermediate_size = 352  # SwiGLU MLP width
num_hidden_layers = 4  # decoder layers
num_attention_heads = 4  # query heads
num_key_value_heads = 2  # key/value heads (grouped-query attention)
activation_checkpointing = False  # recompute each layer in backward: less activation memory, more compute
# optimizer
optimizer = "adalomo"  # adalomo | lomo | adam_mini | adamw
fused = None  # None: True for lomo/adalomo
learning_rate = None  # None: DEFAULT_LR (5e-4 for adalomo, as the AdaLomo paper); DEMO_LR for scratch
weight_decay = 0.0  # decoupled, p *= 1 - lr*wd (Adam-mini skips 1-D tensors)
beta1 = 0.9  # adam_mini, adamw
beta2 = 0.95  # adam_mini, adamw
adam_mini_state = "float32"  # adam_mini's first moment m: float32 | bfloat16 | int8 (8 bits: 1 byte a parameter)
grad_clip = None  # None: 1.0, except 0 (off) for adalomo (train_gpt2.DEFAULT_CLIP)
stochastic_rounding = True  # bf16 parameters, lowmem optimizers
batch_size = 8  # examples per micro-batch
gradient_accumulation_steps = 1  # micro-batches per step (fused: each one's gradient is used in its backward)
max_iters = 200  # fine-tuning steps
warmup_iters = 10  # linear lr warmup, then lr_schedule decay
lr_decay_iters = None  # None: max_iters
min_lr = None  # None: learning_rate / 10
lr_schedule = "cosine"  # cosine | linear
eval_interval = 100  # iterations between val-loss evaluations (each also saves out_dir/ckpt.pt)
eval_iters = 10  # pre-training val batches (fine-tuning val loss is over the whole val set)
log_interval = 20  # iterations between progress lines
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "float32"  # parameters; bfloat16 is the memory-saving setting for real models
amp = False  # bf16 autocast of forward/backward with fp32 parameters (CUDA)
compile = False  # torch.compile the model (slow to start)
fsdp = False  # under torchrun: FSDP2 shards parameters, gradients, optimizer state (each layer, the root); resumes on any number of ranks
seed = 1337  # model init and data order
plan = False  # print this run's memory plan (bench.py plan: every optimizer at batch_size x max_length; per rank with fsdp) and exit
# ----------------------------------------------------------------------------------------

DEFAULT_LR = {"adalomo": 5e-4, "lomo": 1e-2, "adam_mini": 1e-5, "adamw": 1e-5}  # real checkpoints
# The offline demo's tiny, briefly pre-trained model needs larger steps to show an effect in
# a few hundred iterations (these lrs are for that smoke run only).
DEMO_LR = {"adalomo": 1e-2, "lomo": 3e-2, "adam_mini": 1e-3, "adamw": 1e-3}
OPTIONAL = dict(common.OPTIONAL)
DEFAULTS = {k: v for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
            and (isinstance(v, (int, float, bool, str)) or k in OPTIONAL)}
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


# ----------------------------------------------------------------------------------------
# model: LLaMA 2/3 (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention)

@dataclass
class LlamaConfig:
    vocab_size: int = 260
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int = None
    eos_token_id: int = None
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf):
        """From a config.json dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
        hf = dict(hf)
        rope = hf.pop("rope_parameters", None) or {}
        hf.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            hf.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if isinstance(hf.get("eos_token_id"), list):
            hf["eos_token_id"] = hf["eos_token_id"][0]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in known})

    def to_hf(self, dtype):
        cfg = {k: v for k, v in asdict(self).items() if k != "activation_checkpointing"}
        return dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                    torch_dtype=str(dtype).replace("torch.", ""))


def rope_inv_freq(config):
    """Rotary frequencies, with Llama 3.1 ("llama3") or linear position scaling."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # keep high frequencies, divide low ones by factor, blend in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    if kind != "default":
        raise common.InputError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.n_heads // self.n_kv  # GQA: each key/value head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LlamaForCausalLM. forward(idx, labels) -> (logits, mean loss over labels != -100);
    labels are aligned with idx (the shift happens here, as in transformers)."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # lowmem.partition reads num_attention_heads / num_key_value_heads / head_dim
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = {}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def rope(self, T, device, dtype):
        if device not in self._inv_freq:  # not a buffer: it must stay fp32 when the model is bf16
            self._inv_freq[device] = rope_inv_freq(self.config).to(device)
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self._inv_freq[device])
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx, labels=None):
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(idx.size(1), idx.device, x.dtype)
        for layer in self.model.layers:
            if self.config.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
        return logits, loss

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, **overrides):
        """Read config.json and the weights (model.safetensors, sharded safetensors with its
        index, or pytorch_model*.bin) one tensor at a time into a model allocated once."""
        with open(common.hf_file(path, "config.json")) as f:
            config = LlamaConfig.from_hf(json.load(f))
        for k, v in overrides.items():
            setattr(config, k, v)
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device="cpu")  # allocated once, in the target dtype
        if config.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        common.load_hf_weights(path, model.state_dict(), "LLaMA", _skip_rope_buffer, tied)
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_bytes=5 * 2 ** 30):
        """config.json + safetensors (sharded above max_shard_bytes, with the index file), or
        pytorch_model.bin without safetensors. Written to a temp dir, then renamed into place.
        state_dict: the whole tensors, when the model's own are FSDP2 shards."""
        tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        weights = {k: v.contiguous() for k, v in (state_dict or self.state_dict()).items()
                   if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        dtype = next(iter(weights.values())).dtype
        _write_weights(tmp, weights, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(self.config.to_hf(dtype), f, indent=2)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)


def _skip_rope_buffer(name, tensor):
    """Older checkpoints store rotary_emb.inv_freq; it is recomputed here (Llama.rope)."""
    return None if name.endswith("rotary_emb.inv_freq") else (name, tensor)


def _write_weights(directory, weights, max_shard_bytes):
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(weights, os.path.join(directory, "pytorch_model.bin"))
        return
    shards, size = [{}], 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


# ----------------------------------------------------------------------------------------
# tokenizers: a checkpoint's tokenizer.json (optional `tokenizers` package) or bytes

class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS 256, EOS 257, PAD 258 (vocab padded to 260)."""
    vocab_size, bos_id, eos_id, pad_id = 260, 256, 257, 258
    files = ()

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

    def __init__(self, path, config):
        try:
            from tokenizers import Tokenizer  # optional: only with a real checkpoint
        except ImportError:
            raise SystemExit("init_from: reading the checkpoint's tokenizer.json needs `pip install tokenizers`")
        self.tok, self.dir = Tokenizer.from_file(common.hf_file(path, "tokenizer.json")), path
        self.bos_id, self.eos_id = config.bos_token_id, config.eos_token_id
        self.pad_id = self.eos_id if self.eos_id is not None else 0  # padding is masked anyway

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids)


# ----------------------------------------------------------------------------------------
# data: JSONL instruction pairs, prompt tokens masked; multiple-choice scoring

def read_jsonl(path, kind="sft"):
    """Examples as (prompt, response) pairs (kind='sft') or MC dicts; errors name the line."""
    if not os.path.isfile(path):
        raise common.MissingInput(f"{path}: no such JSONL file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise common.InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(_parse_example(ex, kind, f"{path}:{n}"))
    if not out:
        raise common.InputError(f"{path}: no examples")
    return out


def _parse_example(ex, kind, where):
    def text(key):
        if not isinstance(ex.get(key), str):
            raise common.InputError(f"{where}: {key!r} must be a string")
        return ex[key]
    if not isinstance(ex, dict):
        raise common.InputError(f"{where}: expected a JSON object")
    if kind == "mc":
        choices, label = ex.get("choices"), ex.get("label")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            raise common.InputError(f"{where}: 'choices' must be a list of at least two strings")
        if not (isinstance(label, int) and 0 <= label < len(choices)):
            raise common.InputError(f"{where}: 'label' must be an index into choices")
        return {"prompt": text("prompt"), "choices": choices, "label": label}
    if "prompt" in ex:
        return text("prompt"), text("response")
    if "instruction" in ex:  # Alpaca's template
        extra = f"\n\n### Input:\n{text('input')}" if ex.get("input") else ""
        return f"### Instruction:\n{text('instruction')}{extra}\n\n### Response:\n", text("output")
    raise common.InputError(f"{where}: expected keys prompt/response or instruction/input/output")


def tokenize_pairs(pairs, tok, max_length):
    """(ids, labels) per pair, labels = IGNORE on BOS and prompt; returns also the truncated count."""
    examples, truncated = [], 0
    for prompt, response in pairs:
        p, r = [tok.bos_id] * (tok.bos_id is not None) + tok.encode(prompt), tok.encode(response) + [tok.eos_id]
        ids, labels = p + r, [IGNORE] * len(p) + r
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if any(t != IGNORE for t in labels[1:]):  # at least one response token survived
            examples.append((ids, labels))
    return examples, truncated


def pad_batch(examples, pad_id, device):
    """Right padding: causal attention never looks right, and pad labels are IGNORE."""
    T = max(len(ids) for ids, _ in examples)
    idx = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in examples])
    labels = torch.tensor([lab + [IGNORE] * (T - len(lab)) for _, lab in examples])
    return idx.to(device), labels.to(device)


@torch.no_grad()
def mean_loss(model, examples, batch_size, pad_id, device):
    """Token-weighted loss over every example (the whole val set)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        idx, labels = pad_batch(examples[i:i + batch_size], pad_id, device)
        n = int((labels[:, 1:] != IGNORE).sum())
        total, count = total + model(idx, labels)[1].item() * n, count + n
    model.train()
    return total / count


@torch.no_grad()
def mc_accuracy(model, questions, tok, device):
    """Each choice scored by the mean log-probability of its tokens after the prompt (LOMO
    paper's evaluation); accuracy of the argmax."""
    model.eval()
    correct = 0
    for q in questions:
        pairs = [(q["prompt"], c) for c in q["choices"]]
        examples = [(ids[:-1], lab[:-1]) for ids, lab in tokenize_pairs(pairs, tok, 10 ** 9)[0]]  # no EOS
        idx, labels = pad_batch(examples, tok.pad_id, device)
        logp = model(idx)[0][:, :-1].float().log_softmax(-1)
        target, mask = labels[:, 1:], labels[:, 1:] != IGNORE
        tok_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        correct += int((tok_logp.sum(1) / mask.sum(1)).argmax()) == q["label"]
    model.train()
    return correct / len(questions)


def stdlib_qa():
    """Q&A pairs from the standard library: 'What does `json.dumps` do?' -> the first sentence
    of its docstring, for public top-level functions of public modules (parsed, not imported)."""
    root = sysconfig.get_paths()["stdlib"]
    pairs = []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        module = os.path.basename(path)[:-3]
        if module.startswith("_") or module in ("this", "antigravity"):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_"):
                sentence = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".") + "."
                if 10 < len(sentence) < 160:
                    pairs.append((f"Q: What does `{module}.{node.name}` do?\nA: ", sentence))
    return pairs


def mc_from_pairs(pairs, n_choices=4):
    """Multiple-choice questions whose wrong answers are other pairs' answers (deterministic)."""
    questions = []
    for i, (prompt, answer) in enumerate(pairs):
        wrong = [pairs[(i + 7 * k) % len(pairs)][1] for k in range(1, n_choices)]
        label = zlib.crc32(prompt.encode()) % n_choices
        questions.append({"prompt": prompt, "choices": wrong[:label] + [answer] + wrong[label:], "label": label})
    return questions


# ----------------------------------------------------------------------------------------
# training

def validate(cfg):
    common.validate_training(cfg, DEFAULT_LR, "out-llama",
                            lambda cfg: DEMO_LR if _base_model(cfg) == "scratch" else DEFAULT_LR)
    if cfg["lr_schedule"] not in ("cosine", "linear"):
        common.config_error(f"lr_schedule must be cosine or linear, got {cfg['lr_schedule']!r}")
    if cfg["max_length"] < 8:
        common.config_error(f"max_length must be >= 8, got {cfg['max_length']}")


def load_data(cfg, tok):
    if cfg["data"] == "stdlib":
        pairs = stdlib_qa()
    else:
        pairs = read_jsonl(cfg["data"])
    if cfg["val_data"]:
        train_pairs, val_pairs = pairs, read_jsonl(cfg["val_data"])
    else:  # every 10th (by a hash of the prompt, so the split does not depend on order)
        held = [zlib.crc32(p.encode()) % 10 == 0 for p, _ in pairs]
        train_pairs = [x for x, h in zip(pairs, held) if not h]
        val_pairs = [x for x, h in zip(pairs, held) if h]
    train, cut = tokenize_pairs(train_pairs, tok, cfg["max_length"])
    val, _ = tokenize_pairs(val_pairs, tok, cfg["max_length"])
    if not train or not val:
        raise SystemExit(f"data: {len(train)} train and {len(val)} val examples; need at least one of each")
    if cfg["mc_eval"]:
        mc = {"mc": read_jsonl(cfg["mc_eval"], "mc")}
    elif cfg["data"] == "stdlib":  # the demo's own: seen (train) vs held-out questions
        mc = {"seen": mc_from_pairs(train_pairs)[:50], "held-out": mc_from_pairs(val_pairs)}
    else:
        mc = {}
    return train, val, cut, mc


def _base_model(cfg):
    """init_from, or for resume the run's original base (read lazily: mmap, no tensor data)."""
    path = common.checkpoint_path(cfg)
    if cfg["init_from"] != "resume" or not os.path.isfile(path):
        return cfg["init_from"]
    return common.read_checkpoint(path, mmap=True)["config"]["init_from_base"]


ARCH_KEYS = ("data", "max_length", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads")


def build(cfg):
    """(model, tokenizer, ckpt): from a HF directory, from scratch, or from the resume ckpt
    (which records the original base in cfg["init_from_base"])."""
    ckpt = common.load_checkpoint(cfg, ARCH_KEYS) if cfg["init_from"] == "resume" else None
    base = cfg["init_from_base"] = ckpt["config"]["init_from_base"] if ckpt else cfg["init_from"]
    dtype = getattr(torch, cfg["dtype"])
    if base == "scratch":
        tok = ByteTokenizer()
        model = Llama(scratch_config(cfg))
    else:
        with open(common.hf_file(base, "config.json")) as f:
            tok = HFTokenizer(base, LlamaConfig.from_hf(json.load(f)))
        model = Llama.from_pretrained(base, dtype, activation_checkpointing=cfg["activation_checkpointing"])
    return model, tok, ckpt  # the Trainer loads ckpt["model"] (after sharding, under fsdp)


def scratch_config(cfg):
    return LlamaConfig(ByteTokenizer.vocab_size, cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                       cfg["num_attention_heads"], cfg["num_key_value_heads"], max_position_embeddings=cfg["max_length"],
                       activation_checkpointing=cfg["activation_checkpointing"])


def print_plan(cfg):
    """--plan=True: bench.py plan for this run, from config.json alone (no weight is read), against
    the memory of the device it would run on (a GPU's, or the machine's RAM)."""
    import argparse
    import bench
    base = _base_model(cfg)
    if base == "scratch":
        config = scratch_config(cfg).to_hf(cfg["dtype"])
    else:
        with open(common.hf_file(base, "config.json")) as f:
            config = json.load(f)
    dev = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else
                       "cpu" if cfg["device"] == "auto" else cfg["device"])
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    args = argparse.Namespace(model=base, batch=cfg["batch_size"], seq=cfg["max_length"], dtype=cfg["dtype"],
                              activation_checkpointing=cfg["activation_checkpointing"], device_memory=str(memory),
                              hf_eager=False, master_weights=False,  # --fsdp=True under torchrun: per rank
                              world=int(os.environ.get("WORLD_SIZE", "1")) if cfg["fsdp"] else 1)
    bench.print_plan(bench.plan_rows(config, args), args)


def pretrain(model, cfg, dev, rank, world):
    """Offline demo only: a short byte-level LM pre-training on Python's docs (train_gpt2's
    stdlib data), so that fine-tuning starts from a model that knows some English."""
    if rank == 0:
        common.prepare_stdlib()
    text = common.Data(common.STDLIB_DIR, cfg["max_length"] - 1)
    pcfg = dict(cfg, max_iters=cfg["pretrain_iters"], learning_rate=common.DEFAULT_LR[cfg["optimizer"]],
                warmup_iters=50, lr_decay_iters=cfg["pretrain_iters"], out_dir=os.path.join(cfg["out_dir"], "pretrain"),
                eval_interval=cfg["pretrain_iters"], fused=cfg["fused"], log_interval=max(cfg["pretrain_iters"] // 8, 1))
    pcfg["min_lr"] = pcfg["learning_rate"] / 10
    trainer = common.Trainer(model, pcfg, dev, rank, world, seed_offset=1)

    def windows(gen, share=(0, 1)):
        x, y = text.batch("train", cfg["batch_size"], gen, dev, share)
        full = torch.cat([x, y[:, -1:]], 1)
        return full, full  # Llama shifts labels itself

    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    trainer.log(f"pre-training {model_size(model)} on Python's docs (bytes) for {cfg['pretrain_iters']} iters "
                f"at lr {pcfg['learning_rate']:g} (train_gpt2.DEFAULT_LR['{cfg['optimizer']}'])")
    trainer.run(lambda: windows(trainer.data_gen, (rank, world)), lambda: common.estimate_loss(model, lambda: windows(gen), cfg["eval_iters"]),
                cfg["batch_size"] * cfg["max_length"] * world)


def model_size(model):
    return f"a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter LLaMA"


def train(cfg):
    if cfg["plan"]:
        return print_plan(cfg)
    dev, rank, world = common.setup_device(cfg["device"], cfg["fsdp"])
    torch.manual_seed(cfg["seed"])
    model, tok, ckpt = build(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    train_set, val_set, cut, mc = load_data(cfg, tok)
    log(f"{model_size(model)} | {len(train_set)} train / {len(val_set)} val examples ({cut} truncated to "
        f"max_length {cfg['max_length']}) | {cfg['optimizer']} ({'fused' if cfg['fused'] else 'classic'}) "
        f"fine-tuning lr {cfg['learning_rate']:g} | {cfg['dtype']} on {dev}{f' x{world}' if world > 1 else ''}")
    if cfg["init_from_base"] == "scratch" and not ckpt:
        log("SMOKE RUN of the pipeline on a tiny model and stdlib text, not a useful model. "
            "Fine-tune a real checkpoint with --init_from=DIR --data=FILE.jsonl")
        if cfg["pretrain_iters"]:
            pretrain(model, cfg, dev, rank, world)
    trainer = common.Trainer(model, cfg, dev, rank, world, ckpt)
    scores = {}

    def report(when):
        scores[when] = {name: mc_accuracy(model, qs, tok, dev) for name, qs in mc.items()}
        if scores[when]:
            log(f"{when}: " + " | ".join(f"{k} multiple-choice accuracy {v:.1%}" for k, v in scores[when].items()))

    everyone = rank == 0 or cfg["fsdp"]  # FSDP2's forward needs every rank (rank 0 logs)
    if everyone and not ckpt:
        report("before fine-tuning")

    def next_batch():
        ix = common.rank_indices(len(train_set), cfg["batch_size"], trainer.data_gen, (rank, world))
        return pad_batch([train_set[i] for i in ix], tok.pad_id, dev)

    tokens = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * world * \
        sum(len(ids) for ids, _ in train_set) / len(train_set)
    history = trainer.run(next_batch, lambda: mean_loss(model, val_set, cfg["batch_size"], tok.pad_id, dev), tokens)
    if everyone:
        report("after fine-tuning")
    # under FSDP2 every rank takes part in gathering the whole tensors; rank 0 writes them
    weights = None
    if cfg["fsdp"]:
        model.reshard()  # an eval forward leaves the root's parameters gathered
        weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        save_dir = cfg["save_dir"] or os.path.join(cfg["out_dir"], "hf")
        model.save_pretrained(save_dir, weights)
        for name in tok.files:
            if os.path.isfile(os.path.join(tok.dir, name)):
                shutil.copy(os.path.join(tok.dir, name), save_dir)
        (first, v0), (_, v1) = history["val"][0], history["val"][-1]
        log(f"done: val loss {v0:.4f} -> {v1:.4f} | peak memory {history['peak_mb']:,.0f} MB | optimizer state "
            f"{history['state_bytes'] / 2 ** 20:.2f} MB | model saved to {save_dir}")
    history["mc"] = scores
    common.leave_process_group(world)
    return history


if __name__ == "__main__":
    common.main(train, __file__, DEFAULTS, OPTIONAL, validate)
