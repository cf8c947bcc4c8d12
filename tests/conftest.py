"""Fixtures: tiny random LLaMA checkpoints written to disk, tiny trained tokenizers, a naive reference."""
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kv_cache  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
        "Early exit lets easy tokens leave the network after a few layers, while hard ones use all of them. "
        "Numbers like 12345 and 67890 appear too, as does punctuation: commas, colons; and (brackets)! ") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(autouse=True)
def check_cache_writes(monkeypatch):
    """Invariant 4 everywhere: a KV cache slot read before it was written fails the test."""
    monkeypatch.setattr(kv_cache, "CHECK_WRITES", True)


def write_bpe_tokenizer(d: Path):
    """A byte-level BPE tokenizer.json trained on TEXT, with ChatML special tokens (ids 0-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                         "add_bos_token": False, "chat_template": CHATML}))
    return tok.get_vocab_size()


def write_sp_tokenizer(d: Path):
    """A sentencepiece tokenizer.model trained on TEXT (LLaMA-2 style: BOS=1, EOS=2, BOS added)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(". ")), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()


def hf_weights(cfg: dict, seed=0):
    """Random weights with Hugging Face names and [out, in] shapes."""
    g = torch.Generator().manual_seed(seed)
    D, F_, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # gain ~1 per matmul at width 64
    w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = r(V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + r(D), p + "post_attention_layernorm.weight": 1 + r(D),
              p + "self_attn.q_proj.weight": r(q, D), p + "self_attn.k_proj.weight": r(kv, D),
              p + "self_attn.v_proj.weight": r(kv, D), p + "self_attn.o_proj.weight": r(D, q),
              p + "mlp.gate_proj.weight": r(F_, D), p + "mlp.up_proj.weight": r(F_, D), p + "mlp.down_proj.weight": r(D, F_)}
    return w


def make_checkpoint(d: Path, n_kv_heads=2, shards=1, tokenizer="bpe", tie=False, seed=0, **over):
    """Write a tiny LLaMA checkpoint directory; returns (dir, weights dict, config dict)."""
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    vocab = write_bpe_tokenizer(d) if tokenizer == "bpe" else write_sp_tokenizer(d)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": n_kv_heads, "vocab_size": vocab,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie,
           "bos_token_id": 1, "eos_token_id": 2} | over
    (d / "config.json").write_text(json.dumps(cfg))
    w = hf_weights(cfg, seed)
    names = list(w)
    if shards == 1:
        save_file(w, str(d / "model.safetensors"))
    else:
        index = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: w[n] for n in part}, str(d / fname))
            index |= {n: fname for n in part}
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return d, w, cfg


def reference_forward(w, cfg, ids, n_layers=None, inv_freq=None):
    """Naive LLaMA in float64, written from the paper's equations; logits [B, T, V] after n_layers layers.

    inv_freq: the RoPE frequencies [head_dim/2] (default: plain RoPE with cfg's rope_theta)."""
    w = {k: v.double() for k, v in w.items()}
    D, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, B, T = cfg.get("head_dim") or D // H, cfg["rms_norm_eps"], *ids.shape
    norm = lambda x, g: x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd) if inv_freq is None else inv_freq
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]     # [T, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # [B, heads, T, hd], first half / second half pairs
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)

    x = w["model.embed_tokens.weight"][ids]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["num_hidden_layers"] if n_layers is None else n_layers):
        p = f"model.layers.{i}."
        xn = norm(x, w[p + "input_layernorm.weight"])
        q = (xn @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (xn @ w[p + "self_attn.k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (xn @ w[p + "self_attn.v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        xn = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = xn @ w[p + "mlp.gate_proj.weight"].T, xn @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return norm(x, w["model.norm.weight"]) @ head.T


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A loaded tiny GQA model with a BPE tokenizer: (model, tokenizer, weights, config, dir)."""
    from checkpoint import load
    d, w, cfg = make_checkpoint(tmp_path_factory.mktemp("tiny"))
    model, tok = load(d)
    return model, tok, w, cfg, d


@pytest.fixture(scope="session")
def smollm():
    """The real default model (converted on first use)."""
    from checkpoint import load
    from convert import default_checkpoint
    return load(default_checkpoint())
