"""The LLaMA core: forward pass against a reference, cache, loading, tokenizers, bad input."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, reference_forward
from checkpoint import load, read_config, render_chat
from checkpoint import UserError

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
                h, _ = model.layer(i, h, torch.tensor([t]), cache, torch.ones(1, t + 1, dtype=torch.bool))
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
    c = read_config(base | {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
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
        read_config(CONFIG_BASE | extra)


def test_keys_that_do_not_change_the_math_are_ignored():
    assert read_config(CONFIG_BASE) == read_config(CONFIG_BASE | {"use_cache": True, "initializer_range": 0.02, "transformers_version": "5.23.0",
                                  "pretraining_tp": 1, "attention_dropout": 0.0, "sliding_window": None,
                                  "layer_types": ["full_attention"] * 2, "partial_rotary_factor": 1.0, "attention_bias": False})


def test_sample_cli_reports_bad_input_as_one_error_line(tmp_path):
    """The one subprocess test of sample.py: its wrapper turns a refusal into one 'error:' line, no traceback."""
    d, _, cfg = make_checkpoint(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(d), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: rope_scaling type 'yarn' is not implemented (supported: default, linear, llama3)"


def test_bpe_tokenizer_round_trip_and_chat(tiny):
    _, tok, *_ = tiny
    text = "The quick brown fox, 12345 ünïcödé! and (brackets)"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.prompt("hello")
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
    assert not tok.chat_template


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


# What sample.py's wrapper prints as one "error:" line: UserError, and a ValueError the mechanism raises for an
# argument it refuses by name (a policy setting out of range). Checked in-process; the wrapper has its own test above.
CLI_ERRORS = (UserError, ValueError)


def run_sample(*args):
    """sample.main in this process (its own model load, like the command); its output is captured by pytest."""
    from sample import main
    return main(list(args))


@pytest.mark.parametrize("args,message", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "500"], "exceed the model's context length of 128"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompt", "hi", "--top-p", "1.5", "--temperature", "1"], "--top-p must be in"),
    (["--prompt", "hi", "--top-k", "0", "--temperature", "1"], "--top-k must be >= 1"),
    (["--prompt", "hi", "--policy", "confidence", "--threshold", "1.5"], "confidence threshold 1.5 is out of range"),
    (["--prompt", "hi", "--policy", "router", "--exits", "/nonexistent.safetensors"], "router file /nonexistent.safetensors not found"),
    (["--prompt", "hi", "--temperature", "inf"], "--temperature must be a finite number"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--compare", "--max-new-tokens", "1"], "--compare measures decode speed"),
    (["--prompt", "hi", "--seed", str(2 ** 64)], "--seed must be in"),
    (["--prompt", "hi", "--top-k", "5"], "--top-k and --top-p do nothing with greedy decoding"),
    (["--prompt", "hi", "--policy", "static", "--exit-layer", "0"], "static exit layer 0 is out of range"),
    (["--prompt", "hi", "--policy", "static", "--exit-layer", "2", "--threshold", "0.5"], "--threshold does nothing"),
    (["--prompt", "hi", "--policy", "confidence", "--threshold", "nan"], "confidence threshold nan is out of range"),
    (["--prompt", "hi", "--prompt-exit-layer", "2", "--prompt-exits", "p.st"], "two prompt policies; choose one"),
    (["--prompt", "hi", "--prompt-exit-layer", "9"], "static exit layer 9 is out of range"),
    (["--prompt", "hi", "--fill", "/nonexistent.safetensors"], "fill calibration file /nonexistent.safetensors not found"),
])
def test_sample_bad_input_is_refused_with_its_reason(tiny, args, message):
    with pytest.raises(CLI_ERRORS, match=re.escape(message)) as e:
        run_sample("--checkpoint", str(tiny[4]), *args)
    assert "\n" not in str(e.value)


def test_sample_cli_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_sample("--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")


def test_sample_cli_streams_and_summarises(tiny, capsys):
    run_sample("--checkpoint", str(tiny[4]), "--prompt", "The quick", "--max-new-tokens", "5", "--no-chat",
               "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9")
    assert "tokens/s decode" in capsys.readouterr().err
    run_sample("--checkpoint", str(tiny[4]), "--prompt", "The quick brown fox", "--max-new-tokens", "3", "--no-chat",
               "--policy", "static", "--exit-layer", "5", "--prompt-exit-layer", "2", "--no-color")
    err = capsys.readouterr().err
    assert "mean layers/token: prefill" in err and "prefill 6.0" not in err


# ----------------------------------------------------------------------------- bad config and tokenizer fields: nothing silently different

def edit_config(**changes):
    def edit(d, w, c):
        (d / "config.json").write_text(json.dumps(c | changes))
    return edit


def write_json(name, obj):
    def edit(d, w, c):
        (d / name).write_text(json.dumps(obj))
    return edit


def two_shards_with_the_same_tensor(d, w, c):
    from safetensors.torch import save_file
    (d / "model.safetensors").unlink()
    names = list(w)
    save_file({n: w[n] for n in names}, str(d / "a.safetensors"))
    save_file({"model.norm.weight": w["model.norm.weight"]}, str(d / "b.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "a.safetensors" for n in names}
                                                                | {"model.norm.weight": "b.safetensors"}}))


BAD_FIELDS = {
    # weights the config does not account for, or that are not weights
    "a tensor for a 7th layer": (lambda d, w, c: save(d, w | {"model.layers.6.mlp.up_proj.weight": torch.ones(96, 64)}),
                                 "holds model.layers.6.mlp.up_proj.weight, which a 6-layer LLaMA"),
    "integer weights": (lambda d, w, c: save(d, w | {"model.norm.weight": torch.ones(64, dtype=torch.int32)}), "is torch.int32, not floating point"),
    "bool weights": (lambda d, w, c: save(d, w | {"model.norm.weight": torch.ones(64, dtype=torch.bool)}), "is torch.bool, not floating point"),
    "one tensor in two shards": (two_shards_with_the_same_tensor, "model.norm.weight is in both"),
    "tied, but a different lm_head": (lambda d, w, c: (save(d, w | {"lm_head.weight": torch.ones(c["vocab_size"], 64)}),
                                                       edit_config(tie_word_embeddings=True)(d, w, c)), "differs from the embedding"),
    # config values of the wrong type or that make the forward pass meaningless
    "boolean num_hidden_layers": (edit_config(num_hidden_layers=True), "'num_hidden_layers' is true; it must be a whole number"),
    "fractional num_hidden_layers": (edit_config(num_hidden_layers=6.5), "'num_hidden_layers' is 6.5; it must be a whole number"),
    "tie_word_embeddings as a string": (edit_config(tie_word_embeddings="false"), "'tie_word_embeddings' is \"false\"; it must be true or false"),
    "hidden_size as a string": (edit_config(hidden_size="64"), "'hidden_size' is \"64\"; it must be a whole number"),
    "architectures as a string": (edit_config(architectures="LlamaForCausalLM"), "'architectures' .* must be a list"),
    "rope_scaling as a list": (edit_config(rope_scaling=[1, 2]), "'rope_scaling' is \\[1, 2\\]; it must be an object"),
    "rope_theta 0": (edit_config(rope_theta=0), "rope_theta 0.0 must be a positive number"),
    "rope_theta NaN": (edit_config(rope_theta=float("nan")), "rope_theta nan must be a positive number"),
    "zero scaling factor": (edit_config(rope_scaling={"rope_type": "linear", "factor": 0}), "needs a positive number 'factor', got 0"),
    "negative scaling factor": (edit_config(rope_scaling={"rope_type": "linear", "factor": -2.0}), "needs a positive number 'factor'"),
    "negative rms_norm_eps": (edit_config(rms_norm_eps=-1e-5), "rms_norm_eps -1e-05 must be a finite number >= 0"),
    "bos outside the vocabulary": (edit_config(bos_token_id=99999), "bos_token_id 99999 is not a token id"),
    "eos outside the vocabulary": (write_json("generation_config.json", {"eos_token_id": [2, 5000]}), "special token id\\(s\\) \\[5000\\] lie outside"),
    "eos of the wrong type": (write_json("generation_config.json", {"eos_token_id": "2"}), "eos_token_id .* must be a token id"),
    "weight_map as a list": (write_json("model.safetensors.index.json", {"weight_map": ["model.safetensors"]}), "must map tensor names to shard file names"),
    "bos_token as a number": (write_json("tokenizer_config.json", {"bos_token": 5}), "bos_token is 5; it must be a token string"),
    "add_bos_token as a string": (write_json("tokenizer_config.json", {"add_bos_token": "yes"}), "'add_bos_token' is \"yes\"; it must be true or false"),
    "chat_template as a number": (write_json("tokenizer_config.json", {"chat_template": 3}), "chat_template must be a string"),
    "unparsable tokenizer.json": (lambda d, w, c: (d / "tokenizer.json").write_text('{"model": 3}'), "cannot read the tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_config_and_tokenizer_fields_give_one_line_error(tmp_path, case):
    edit, message = BAD_FIELDS[case]
    d = broken(tmp_path, edit)
    with pytest.raises(UserError, match=message) as e:
        load(d)
    assert "\n" not in str(e.value)


def test_unparsable_sentencepiece_model_is_one_error(tmp_path):
    d, _, _ = make_checkpoint(tmp_path, tokenizer="sp")
    (d / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read the tokenizer"):
        load(d)


def test_a_stray_safetensors_file_is_not_loaded(tmp_path):
    """A backup beside model.safetensors (with other weights) must not change the model."""
    from safetensors.torch import save_file
    d, w, cfg = make_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    clean, _ = load(d)
    save_file({k: torch.zeros_like(v) for k, v in w.items()}, str(d / "model-backup.safetensors"))
    with_stray, _ = load(d)
    with torch.no_grad():
        assert torch.equal(clean(ids), with_stray(ids))


@pytest.mark.parametrize("kwargs,message", [
    ({"ckpt_dir": 42}, "must be a directory path, not int"),
    ({"dtype": torch.int32}, "dtype torch.int32 is not supported"),
    ({"dtype": torch.bool}, "dtype torch.bool is not supported"),
    ({"dtype": torch.complex64}, "dtype torch.complex64 is not supported"),
    ({"dtype": "float32"}, "dtype 'float32' is not supported"),
    ({"device": "tpu9"}, "unknown device 'tpu9'"),
])
def test_model_load_bad_arguments(tiny, kwargs, message):
    with pytest.raises(UserError, match=message):
        load(**({"ckpt_dir": tiny[4]} | kwargs))


def test_fingerprint_follows_every_weight_not_only_the_final_norm(tmp_path):
    from checkpoint import model_id
    a, w, _ = make_checkpoint(tmp_path / "a")
    b, _, _ = make_checkpoint(tmp_path / "b")
    save(b, w | {"model.layers.3.mlp.down_proj.weight": w["model.layers.3.mlp.down_proj.weight"] * 1.01})
    (tmp_path / "b").rename(tmp_path / "a2")
    ma, mb = load(a)[0], load(tmp_path / "a2")[0]
    mb.name = ma.name  # same name, same final norm, one other matrix changed
    assert model_id(ma) != model_id(mb)
    assert model_id(ma) == model_id(load(a, dtype=torch.bfloat16)[0])  # but not the dtype it runs in


def test_sample_cli_prompt_that_is_not_utf8(tiny):
    # the bytes b"caf\xe9" from the shell reach argv as the surrogate-escaped str "caf\udce9"
    with pytest.raises(UserError, match="not valid UTF-8"):
        run_sample("--checkpoint", str(tiny[4]), "--prompt", "caf\udce9")


# ----------------------------------------------------------------------------- chat templates (jinja2, sandboxed)
# Each checkpoint's own template, as its tokenizer_config.json ships it; the expected strings are written from each
# format's documentation (ChatML; Meta's LLaMA-3 and LLaMA-2-chat prompt formats; Zephyr's model card).

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
           "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]"
          "['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message "
          "in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
          "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
          "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
          "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
          "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + "
          "eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] "
          "== 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
          "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
USER = [{"role": "user", "content": "Hi"}]
SYSTEM_USER = [{"role": "system", "content": "Be brief."}] + USER


@pytest.mark.parametrize("template,messages,bos,eos,expected", [
    (SMOLLM2, USER, "<|im_start|>", "<|im_end|>", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
     "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    (SMOLLM2, SYSTEM_USER, "<|im_start|>", "<|im_end|>",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    (LLAMA3, SYSTEM_USER, "<|begin_of_text|>", "<|eot_id|>", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
     "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    (LLAMA2, USER, "<s>", "</s>", "<s>[INST] Hi [/INST]"),
    (LLAMA2, SYSTEM_USER, "<s>", "</s>", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"),
    (ZEPHYR, SYSTEM_USER, "<s>", "</s>", "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"),
], ids=["smollm2-default-system", "smollm2-own-system", "llama3", "llama2-chat", "llama2-chat-system", "zephyr"])
def test_chat_templates_render_as_their_formats_are_documented(template, messages, bos, eos, expected):
    assert render_chat(template, messages, bos, eos) == expected


@pytest.mark.parametrize("template,message", [
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),                                     # does not parse
    (LLAMA2.replace("== 'user') !=", "== 'user') =="), "Conversation roles must alternate"),                   # raises
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),                               # Python internals
    ("{{ ''.__class__.__base__.__subclasses__() }}", "SecurityError"),
    ("{{ messages.append(1) }}", "SecurityError"),                                                          # immutable sandbox
])
def test_a_bad_or_hostile_chat_template_is_one_clear_error(template, message):
    with pytest.raises(UserError, match=f"the chat template failed .*{message}.*use --no-chat"):
        render_chat(template, USER)


def test_a_chat_template_that_is_not_a_string_is_refused(tmp_path):
    d, _, _ = make_checkpoint(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": 42}))
    with pytest.raises(UserError, match="chat_template must be a string"):
        load(d)


def test_a_template_writes_its_own_bos(tmp_path):
    """LLaMA-2's template starts with bos_token: the prompt must not get a second BOS from the tokenizer."""
    d, _, _ = make_checkpoint(tmp_path, tokenizer="sp")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2}))
    _, tok = load(d)
    ids = tok.prompt("Hi")
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id and tok.add_bos
    assert tok.prompt("Hi", chat=False) == tok.encode("Hi")
