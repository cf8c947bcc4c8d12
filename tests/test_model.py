"""The LLaMA core: forward pass against a reference, cache, loading, tokenizers, bad input."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, reference_forward
from model import Config, UserError, load

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("n_kv_heads,shards,tie", [(2, 1, False), (4, 1, True), (1, 3, False)],
                         ids=["gqa-single", "mha-tied", "mqa-sharded"])
def test_forward_matches_naive_reference(tmp_path, n_kv_heads, shards, tie):
    d, w, cfg = make_checkpoint(tmp_path, n_kv_heads=n_kv_heads, shards=shards, tie=tie)
    model, _ = load(d)
    ids = torch.randint(0, cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids)
    assert got.shape == (2, 17, cfg["vocab_size"])
    # the reference runs in float64; float32 rounding of logits of magnitude ~10 stays within these
    torch.testing.assert_close(got.double(), reference_forward(w, cfg, ids), atol=1e-5, rtol=1e-4)


def test_cached_decode_equals_whole_sequence(tiny):
    """Prefill of a prefix, then one token at a time through the cache, gives the whole-sequence logits."""
    model, _, _, cfg, _ = tiny
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(ids)[0]
        cache = model.new_cache(1, 20)
        pos = torch.arange(8)
        h = model.tok_emb[ids[:, :8]]
        for i in range(cfg["num_hidden_layers"]):
            h, _ = model.layer(i, h, pos, cache, pos[:, None] >= pos[None])
        steps = [model.head(h[0])]
        for t in range(8, 20):
            h = model.tok_emb[ids[:, t:t + 1]]
            for i in range(cfg["num_hidden_layers"]):
                h, _ = model.layer(i, h, torch.tensor([t]), cache)
            steps.append(model.head(h[0]))
    torch.testing.assert_close(torch.cat(steps), whole, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- config.json: RoPE, head_dim, refused keys

def expected_inv_freq(theta, head_dim, rope):
    """RoPE frequencies written out one by one, as Meta's reference code computes the llama3 scaling."""
    out = []
    for i in range(head_dim // 2):
        f = 1.0 / theta ** (2 * i / head_dim)
        kind = rope.get("rope_type", "default")
        if kind == "linear":
            f = f / rope["factor"]
        elif kind == "llama3":
            wavelen, orig, lo, hi = 2 * math.pi / f, rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
            if wavelen > orig / lo:
                f = f / rope["factor"]
            elif wavelen >= orig / hi:
                smooth = (orig / wavelen - lo) / (hi - lo)
                f = (1 - smooth) * f / rope["factor"] + smooth * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


ROPES = {"default": {"rope_type": "default"}, "linear": {"rope_type": "linear", "factor": 4.0},
         "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}}  # with theta 5e5 and head_dim 16, every band is used


def rope_config(layout, rope, theta):
    """The same RoPE settings as transformers >= 5 writes them, or as older versions did."""
    if layout == "rope_parameters":
        return {"rope_parameters": {"rope_theta": theta, **rope}}
    return {"rope_theta": theta, "rope_scaling": None if rope["rope_type"] == "default" else dict(rope)}


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_theta+rope_scaling"])
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("head_dim", [None, 24], ids=["head_dim-default", "head_dim-24"])
def test_rope_layouts_and_head_dim_match_the_reference(tmp_path, layout, rope, head_dim):
    theta = 500000.0
    d, w, cfg = make_checkpoint(tmp_path, head_dim=head_dim)
    hf = json.loads((d / "config.json").read_text())
    del hf["rope_theta"]
    (d / "config.json").write_text(json.dumps(hf | rope_config(layout, ROPES[rope], theta)))
    model, _ = load(d)
    hd = head_dim or 16
    assert model.config.head_dim == hd and model.wqkv.shape[-1] == 4 * hd + 2 * 2 * hd
    ids = torch.randint(0, cfg["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    want = reference_forward(w, cfg | {"rope_theta": theta}, ids, inv_freq=expected_inv_freq(theta, hd, ROPES[rope]))
    with torch.no_grad():
        got = model(ids).double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if rope != "default":  # the scaling changes the logits, so a loader that ignored it would fail above
        plain = reference_forward(w, cfg | {"rope_theta": theta}, ids, inv_freq=expected_inv_freq(theta, hd, ROPES["default"]))
        assert (plain - want).abs().max() > 1e-3


def test_rope_parameters_win_over_the_old_keys():
    base = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 10}
    c = Config.from_hf(base | {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
                               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **ROPES["llama3"]}})
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"


CONFIG_BASE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 8, "vocab_size": 10}
REFUSED = {
    "yarn (new layout)": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters type 'yarn' is not implemented"),
    "dynamic (old layout)": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not implemented"),
    "longrope": ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "type 'longrope' is not implemented"),
    "rope per layer type": ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
                            "RoPE parameters per layer type"),
    "llama3 without its parameters": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs a positive number 'low_freq_factor'"),
    "sliding_window": ({"sliding_window": 4096}, "sliding_window = 4096: sliding-window attention is not implemented"),
    "layer_types": ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types .*: attention other than full"),
    "attention soft-capping": ({"attn_logit_softcapping": 50.0}, "attention logit soft-capping is not implemented"),
    "logit soft-capping": ({"final_logit_softcapping": 30.0}, "final logit soft-capping is not implemented"),
    "attention_bias": ({"attention_bias": True}, "a bias in the attention projections is not implemented"),
    "mlp_bias": ({"mlp_bias": True}, "a bias in the MLP projections is not implemented"),
    "partial rotary": ({"partial_rotary_factor": 0.5}, "RoPE on part of each head"),
    "gelu": ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_math_changing_keys_are_refused(case):
    extra, message = REFUSED[case]
    with pytest.raises(UserError, match=message):
        Config.from_hf(CONFIG_BASE | extra)


def test_keys_that_do_not_change_the_math_are_ignored():
    Config.from_hf(CONFIG_BASE | {"use_cache": True, "initializer_range": 0.02, "transformers_version": "5.23.0",
                                  "pretraining_tp": 1, "attention_dropout": 0.0, "sliding_window": None,
                                  "layer_types": ["full_attention"] * 2, "partial_rotary_factor": 1.0, "attention_bias": False})


def test_sample_cli_refuses_an_unsupported_key_in_one_line(tmp_path):
    d, _, cfg = make_checkpoint(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    r = run_sample("--checkpoint", str(d), "--prompt", "hi")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: rope_scaling type 'yarn' is not implemented (supported: default, linear, llama3)"


def test_bpe_tokenizer_round_trip_and_chat(tiny):
    _, tok, *_ = tiny
    text = "The quick brown fox, 12345 ünïcödé! and (brackets)"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.encode(tok.chat("hello"))
    assert chat[0] == tok.id_of("<|im_start|>") and tok.id_of("<|im_end|>") in chat  # specials are single tokens
    assert tok.eos_ids == {2} and not tok.add_bos


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    d, _, _ = make_checkpoint(tmp_path, tokenizer="sp")
    _, tok = load(d)
    text = "A journey of a thousand miles begins with one step, 42 ünïcode."
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.add_bos  # BOS from the checkpoint
    assert tok.decode(ids[1:]) == text
    assert 2 in tok.eos_ids
    assert not tok.has_chat


# ----------------------------------------------------------------------------- bad input

def broken(tmp_path, edit):
    d, w, cfg = make_checkpoint(tmp_path / "ckpt")
    edit(d, w, cfg)
    return d


def save(d, w):
    from safetensors.torch import save_file
    save_file(w, str(d / "model.safetensors"))


BAD = {
    "missing dir": (lambda d, w, c: shutil.rmtree(d), "does not exist"),
    "empty dir": (lambda d, w, c: [p.unlink() for p in d.iterdir()], "is empty"),
    "no safetensors": (lambda d, w, c: (d / "model.safetensors").unlink(), "no weights in .*expected model.safetensors"),
    "wrong shape": (lambda d, w, c: save(d, w | {"model.norm.weight": torch.ones(65)}), "has shape \\(65,\\), expected \\(64,\\)"),
    "missing tensor": (lambda d, w, c: save(d, {k: v for k, v in w.items() if "layers.3.mlp.up" not in k}), "lacks 1 tensor"),
    "malformed config": (lambda d, w, c: (d / "config.json").write_text("{not json"), "malformed JSON"),
    "config missing field": (lambda d, w, c: (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k != "hidden_size"})), "missing the field 'hidden_size'"),
    "unsupported architecture": (lambda d, w, c: (d / "config.json").write_text(json.dumps(c | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})), "unsupported architecture"),
    "missing shard": (lambda d, w, c: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}})), "missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_give_one_clear_error(tmp_path, case):
    edit, message = BAD[case]
    d = broken(tmp_path, edit)
    with pytest.raises(UserError, match=message):
        load(d)


def run_sample(*args):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "500"], "exceed the model's context length of 128"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "1.5", "--temperature", "1"], "--top-p must be in"),
    (["--prompt", "hi", "--top-k", "0"], "--top-k must be >= 1"),
    (["--prompt", "hi", "--policy", "confidence", "--threshold", "1.5"], "confidence threshold 1.5 is out of range"),
    (["--prompt", "hi", "--policy", "router", "--exits", "/nonexistent.safetensors"], "router file /nonexistent.safetensors not found"),
])
def test_sample_cli_bad_input_is_one_line(tiny, args, message):
    r = run_sample("--checkpoint", str(tiny[4]), *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") <= 1, r.stderr  # the error line (plus, at most, the load banner)


def test_sample_cli_missing_checkpoint(tmp_path):
    r = run_sample("--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_sample_cli_streams_and_summarises(tiny):
    r = run_sample("--checkpoint", str(tiny[4]), "--prompt", "The quick", "--max-new-tokens", "5", "--no-chat",
                   "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    assert "tokens/s decode" in r.stderr
