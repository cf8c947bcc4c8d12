"""Prefill the ADEPT way: the calibrated fill, and prompt tokens that exit by their own policy.

5. The calibrated fill with zero statistics is the plain fill, bit for bit.
6. Calibrated, the decoupled fill equals the sequential fill, and the dense form
   (model.forward with an exit pattern) equals forward_tokens under that pattern.
7. In prefill with a prompt policy, the tokens before the read position exit by it, the read
   position by the decode policy, and each policy's own work is counted for its tokens only.
"""
import pytest
import torch
from safetensors.torch import save_file

from adept import FullDepth, PromptPolicy, RouterPolicy, Static, generate
from checkpoint import load_fill, model_id
from kv_cache import fill_decoupled, fill_sequential
from checkpoint import UserError
from test_adept import TOL, TOL_DEFAULT, Pattern, check_invariants, prompt, router_file, run


def mean_states(model, n=24):
    """Statistics of the right shape and scale: the mean hidden state after 0..L layers of one random prompt."""
    hs, ids = [], prompt(model, n, seed=7)[None]
    with torch.no_grad():
        model(ids, hidden_states=hs)
    return torch.stack([model.tok_emb[ids]] + [h for h, *_ in hs])[:, 0].mean(1)  # [L+1, D]


def filled(model, mu, fill):
    """The written K/V slots after filling seven tokens with mixed exit layers."""
    L, n = model.config.n_layers, 7
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, model.config.dim, generator=g) * 3
    pos, exit_layer = torch.tensor([0, 3, 4, 9, 10, 11, 15]), torch.randint(1, L, (n,), generator=g)
    model.fill_mu, cache = mu, model.new_cache(1, 16)
    try:
        with torch.no_grad():
            for e in exit_layer.unique().tolist():
                fill(cache, model, h[exit_layer == e], pos[exit_layer == e], e)
    finally:
        model.fill_mu = None
    slots = lambda t: t.permute(0, 3, 1, 2, 4)[cache.written]  # [L, T, B, kv_heads, hd] -> written slots
    return slots(cache.k), slots(cache.v)


def test_zero_statistics_give_the_plain_fill_bit_for_bit(tiny):
    model = tiny[0]
    zero = torch.zeros(model.config.n_layers + 1, model.config.dim)
    for fill in (fill_decoupled, fill_sequential):
        for a, b in zip(filled(model, None, fill), filled(model, zero, fill)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_calibrated_decoupled_fill_equals_calibrated_sequential_fill(request, which):
    model = request.getfixturevalue(which)[0]
    mu, tol = mean_states(model), TOL if which == "tiny" else TOL_DEFAULT
    calibrated = filled(model, mu, fill_decoupled)
    for a, b, plain in zip(calibrated, filled(model, mu, fill_sequential), filled(model, None, fill_decoupled)):
        torch.testing.assert_close(a, b, **tol)
        assert (a - plain).abs().max() > 100 * tol["atol"]  # the correction does change the fill


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_calibrated_dense_forward_and_prefill_equal_forward_tokens(request, which, monkeypatch):
    """The dense training form, prefill and one-by-one decode all see the same calibrated fill."""
    model = request.getfixturevalue(which)[0]
    L = model.config.n_layers
    pattern = [L, 2, 3, L, 1, 5, L, 2, 6, 4, 1, L] if L == 6 else [30, 12, 24, 30, 8, 18, 27, 30, 20, 10, 29, 30]
    monkeypatch.setattr(model, "fill_mu", mean_states(model))
    tol = TOL if L == 6 else TOL_DEFAULT
    adept_logits, _ = check_invariants(model, len(pattern), pattern, tol=tol)  # prefill = one by one, calibrated
    with torch.no_grad():
        dense = model(prompt(model, len(pattern))[None], exit_layer=torch.tensor([pattern]))[0]
    torch.testing.assert_close(dense, adept_logits, **tol)
    monkeypatch.setattr(model, "fill_mu", None)
    assert not torch.allclose(run(model, prompt(model, len(pattern)), Pattern(pattern))[0], adept_logits, **tol)


def test_fill_files_round_trip_and_are_refused_for_other_weights(tiny, tmp_path, monkeypatch):
    model = tiny[0]
    monkeypatch.setattr(model, "fill_mu", None)
    mu, path = mean_states(model), tmp_path / "r.fill.safetensors"
    save_file({"mu": mu}, str(path), metadata={"base_model": model_id(model)})
    assert torch.equal(load_fill(model, path).fill_mu, mu)
    assert load_fill(model, "plain").fill_mu is None
    assert load_fill(model).fill_mu is None  # the shipped calibration was measured on the default model, not this one
    save_file({"mu": mu}, str(path), metadata={"base_model": "another-model"})
    with pytest.raises(UserError, match="was made for another-model, not for this model"):
        load_fill(model, path)
    save_file({"mu": mu[1:].contiguous()}, str(path), metadata={"base_model": model_id(model)})
    with pytest.raises(UserError, match="is damaged"):
        load_fill(model, path)
    with pytest.raises(UserError, match="fill calibration file .* not found"):
        load_fill(model, tmp_path / "missing.safetensors")


def test_prompt_tokens_exit_by_the_prompt_policy_and_the_read_position_by_the_decode_policy(tiny):
    model = tiny[0]
    L, n = model.config.n_layers, 9
    ids = prompt(model, n)
    logits, exits, _ = run(model, ids, PromptPolicy(Static(2, L), FullDepth(), read=n - 1))
    assert exits.tolist() == [2] * (n - 1) + [L]
    same, _, _ = run(model, ids, Pattern([2] * (n - 1) + [L]))
    assert torch.equal(logits, same)
    # the other way round: the read position exits at 3, the prompt at full depth
    _, exits, _ = run(model, ids, PromptPolicy(FullDepth(), Static(3, L), read=n - 1))
    assert exits.tolist() == [L] * (n - 1) + [3]


def test_generate_with_a_prompt_policy_counts_each_policys_work_for_its_own_tokens(tiny, tmp_path):
    model = tiny[0]
    L, ids = model.config.n_layers, prompt(model, 8).tolist()
    router = RouterPolicy(router_file(model, tmp_path / "r.safetensors"), threshold=1.0, min_layer=2)  # never exits
    g = generate(model, ids, 3, router, prompt_policy=Static(3, L))
    assert g.prompt_exit_layers == [3] * 7 + [L]
    assert g.prefill.router_macs == (L - 2) * router.macs(model.config)  # asked at layers 2..L-1, for the read position only
    assert g.decode.router_macs == 2 * (L - 2) * router.macs(model.config)
    plain = generate(model, ids, 3, router)
    assert g.prefill.saved > plain.prefill.saved
