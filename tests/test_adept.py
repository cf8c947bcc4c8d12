"""The invariants of token-level early exit, on the tiny model and on the default model.

1. The `full` policy reproduces the plain full-depth forward.
2. Prefill with a per-token exit pattern equals decoding the tokens one by one with it.
3. The decoupled KV fill equals the sequential fill.
4. No KV cache slot is read before it is written (conftest turns the check on for every test).
"""
import pytest
import torch
from safetensors.torch import save_file

from adept import (Confidence, FullDepth, Policy, PromptPolicy, Router, RouterPolicy, Static, Stats,
                   forward_tokens, generate, router_features)
from checkpoint import model_id
from sample import make_policy
from conftest import reference_forward
from kv_cache import fill_decoupled, fill_sequential
from checkpoint import UserError, load_router, save_router

TOL = dict(atol=1e-5, rtol=1e-5)
# The default model's logits reach ~20 and pass 30 layers in float32, where a batched matmul and a
# single-row one round differently: prefill and one-by-one decode differ by up to ~6e-5 there.
TOL_DEFAULT = dict(atol=2e-4, rtol=1e-4)


class Pattern(Policy):
    """Forces token at position p to exit at layer exit_at[p]."""
    def __init__(self, exit_at):
        self.exit_at = torch.tensor(exit_at)

    def decide(self, model, i, pos, h, q, k, v):
        return self.exit_at[pos] == i


class Oracle(Policy):
    """Exits at the first layer whose argmax equals the full model's (target[pos]): it needs the answer."""
    def __init__(self, target):
        self.target = target

    def decide(self, model, i, pos, h, q, k, v):
        return model.head(h).argmax(-1) == self.target[pos]


def prompt(model, n, seed=0):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def run(model, ids, policy, cache=None):
    cache = cache or model.new_cache(1, len(ids))
    with torch.no_grad():
        logits, exits = forward_tokens(model, ids, 0, cache, policy, Stats(), logits="all")
    return logits, exits, cache


def one_by_one(model, ids, policy):
    cache = model.new_cache(1, len(ids))
    logits, exits = [], []
    with torch.no_grad():
        for t in range(len(ids)):
            lg, e = forward_tokens(model, ids[t:t + 1], t, cache, policy, Stats(), logits="all")
            logits.append(lg)
            exits.append(e)
    return torch.cat(logits), torch.cat(exits), cache


def check_invariants(model, n, pattern, ref_logits=None, tol=TOL):
    ids = prompt(model, n)
    full, exits, _ = run(model, ids, FullDepth())
    with torch.no_grad():
        plain = model(ids[None])[0]
    torch.testing.assert_close(full, plain, **tol)                                  # invariant 1
    assert (exits == model.config.n_layers).all()
    if ref_logits is not None:
        torch.testing.assert_close(full.double(), ref_logits, atol=1e-5, rtol=1e-4)

    pre_logits, pre_exits, pre_cache = run(model, ids, Pattern(pattern))
    dec_logits, dec_exits, dec_cache = one_by_one(model, ids, Pattern(pattern))
    assert pre_exits.tolist() == dec_exits.tolist() == list(pattern)
    torch.testing.assert_close(pre_logits, dec_logits, **tol)                       # invariant 2: logits
    assert pre_cache.written.all() and dec_cache.written.all()                       # every slot written once filled
    torch.testing.assert_close(pre_cache.k, dec_cache.k, **tol)                      # ... and the whole cache
    torch.testing.assert_close(pre_cache.v, dec_cache.v, **tol)
    return pre_logits, pre_exits


def test_invariants_on_tiny_model(tiny):
    model, _, w, cfg, _ = tiny
    L = cfg["num_hidden_layers"]
    pattern = [1, L, 3, 2, L, 1, 4, 5, 2, L, 3, 6]  # mixed exit layers, also the first token early
    ref = reference_forward(w, cfg, prompt(model, len(pattern))[None])[0]
    check_invariants(model, len(pattern), pattern, ref)


def test_invariants_on_default_model(smollm):
    model, _ = smollm
    pattern = [30, 12, 24, 30, 8, 18, 27, 30, 20, 10, 29, 30, 16, 22]
    check_invariants(model, len(pattern), pattern, tol=TOL_DEFAULT)


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_decoupled_fill_equals_sequential_fill(request, which):
    model = request.getfixturevalue(which)[0]
    L, n = model.config.n_layers, 7
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, model.config.dim, generator=g)
    pos = torch.tensor([0, 3, 4, 9, 10, 11, 15])
    exit_layer = torch.randint(1, L + 1, (n,), generator=g)
    exit_layer[0] = 1  # skips every layer but the first
    a, b = model.new_cache(1, 16), model.new_cache(1, 16)
    with torch.no_grad():
        for e in exit_layer.unique().tolist():  # the tokens that exit after layer e, together
            fill_decoupled(a, model, h[exit_layer == e], pos[exit_layer == e], e)
            fill_sequential(b, model, h[exit_layer == e], pos[exit_layer == e], e)
    assert torch.equal(a.written, b.written)
    for j, p in enumerate(pos.tolist()):  # exactly the skipped layers of each token were written
        assert a.written[:, p].tolist() == [i >= int(exit_layer[j]) for i in range(L)]
    slots = lambda t: t.permute(0, 3, 1, 2, 4)[a.written]  # [L, T, B, kv_heads, hd] -> written slots
    torch.testing.assert_close(slots(a.k), slots(b.k), **TOL)
    torch.testing.assert_close(slots(a.v), slots(b.v), **TOL)


def test_reading_an_unwritten_slot_fails(tiny):
    cache = tiny[0].new_cache(1, 8)
    with pytest.raises(AssertionError, match="read from the KV cache before being written"):
        cache.read(0, 3)


def test_exit_at_last_layer_is_full_depth(tiny):
    model, *_ = tiny
    L = model.config.n_layers
    ids = prompt(model, 9)
    full, _, full_cache = run(model, ids, FullDepth())
    static, exits, static_cache = run(model, ids, Static(L, L))
    assert (exits == L).all()
    assert torch.equal(full, static) and torch.equal(full_cache.k, static_cache.k)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_static_k_equals_k_layers_then_head(tiny, k):
    model, _, w, cfg, _ = tiny
    ids = prompt(model, 10)
    logits, exits, cache = run(model, ids, Static(k, cfg["num_hidden_layers"]))
    assert (exits == k).all() and cache.written.all()
    torch.testing.assert_close(logits.double(), reference_forward(w, cfg, ids[None], n_layers=k)[0], atol=1e-5, rtol=1e-4)


def test_oracle_exits_where_the_head_first_agrees_with_full_depth(tiny):
    model, _, w, cfg, _ = tiny
    ids = prompt(model, 10)
    full, _, _ = run(model, ids, FullDepth())
    target = full.argmax(-1)
    logits, exits, _ = run(model, ids, Oracle(target))
    assert torch.equal(logits.argmax(-1), target)  # every token predicts the full model's argmax
    # the first token attends only to itself, so its states are exactly the plain model's at every layer
    first_agree = next(i for i in range(1, cfg["num_hidden_layers"] + 1)
                       if int(reference_forward(w, cfg, ids[None, :1], n_layers=i)[0, 0].argmax()) == int(target[0]))
    assert int(exits[0]) == first_agree


def test_generate_reports_exit_layers_and_costs(tiny):
    model, *_ = tiny
    L = model.config.n_layers
    ids = prompt(model, 12).tolist()
    g = generate(model, ids, 6, Static(2, L))
    assert g.prompt_exit_layers == [2] * 12 and g.exit_layers == [2] * 6 and len(g.tokens) == 6
    assert g.prefill.mean_exit_layer == 2 and g.decode.mean_exit_layer == 2
    full = generate(model, ids, 6, FullDepth())
    assert full.prefill.saved == 0 and full.prefill.fill_macs == 0
    # static 2 of 6 layers: every token computes a third of the layers, plus a fill of the other four
    assert g.prefill.layer_macs < full.prefill.layer_macs / 2 and g.prefill.fill_macs > 0 and g.prefill.saved > 0.4


def test_full_generation_equals_argmax_of_plain_forward(tiny):
    model, *_ = tiny
    ids = prompt(model, 5).tolist()
    g = generate(model, ids, 8, FullDepth())
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert g.tokens == seq[5:]


def test_settings_out_of_range_are_refused_by_name(tiny):
    model, *_ = tiny
    L = model.config.n_layers
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="confidence threshold .* out of range"):
            Confidence(bad)
    with pytest.raises(ValueError, match="entropy threshold .* out of range"):
        Confidence(-1.0, entropy=True, vocab_size=model.config.vocab_size)
    with pytest.raises(ValueError, match="static exit layer 7 is out of range"):
        Static(L + 1, L)
    with pytest.raises(UserError, match="--min-layer 0 is out of range"):
        make_policy("confidence", model, min_layer=0)
    with pytest.raises(ValueError, match="router threshold 2.0 is out of range"):
        RouterPolicy(Router(model.config), 2.0)


def random_router(model, seed=0):
    """A router with random standardisation and weights, so that folding has something to fold."""
    c = model.config
    r = Router(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (r.mu, r.b1, r.w2, r.b2):
            t.copy_(torch.randn(t.shape, generator=g))
        r.sd.copy_(torch.rand(r.sd.shape, generator=g) + 0.5)
    return r


def test_router_policy_decides_as_its_router_says(tiny):
    """RouterPolicy compares the router's logit with logit(τ) instead of sigmoid(logit) with τ; on
    random states every decision is sigmoid(router) >= τ.
    τ = 1 never exits and τ = 0 always does (sigmoid in float32 reaches 1.0 at logits above ~17, so
    comparing probabilities would let a very confident token through τ = 1)."""
    model, *_ = tiny
    c, r = model.config, random_router(model)
    g = torch.Generator().manual_seed(1)
    n = 300
    h, q, kv = (torch.randn(n, d, generator=g) * 3 for d in (c.dim, c.q_dim, 2 * c.kv_dim))
    k, v = kv.chunk(2, dim=-1)
    for tau in (0.0, 0.1, 0.5, 0.9, 1.0):
        policy = RouterPolicy(r, tau, 1)
        for i in range(1, c.n_layers):
            with torch.no_grad():
                z = r(i, router_features(model, h, q, k, v))
            expected = {0.0: torch.ones(n, dtype=torch.bool), 1.0: torch.zeros(n, dtype=torch.bool)}.get(tau, torch.sigmoid(z) >= tau)
            assert torch.equal(policy.decide(model, i, torch.arange(n), h, q, k, v), expected)
            assert 0 < int((torch.sigmoid(z) >= 0.5).sum()) < n  # the states are on both sides of the boundary


def test_cost_counters_follow_the_exit_layers(tiny):
    """Counted once per call from the exit layers: a router that never exits is asked at every layer from its
    minimum on (but not after the last), and static k computes k of L layers and fills the other L - k."""
    model, *_ = tiny
    c, L, ids = model.config, model.config.n_layers, prompt(model, 10)
    full, never, static = Stats(), Stats(), Stats()
    r = random_router(model)
    with torch.no_grad():
        forward_tokens(model, ids, 0, model.new_cache(1, 10), FullDepth(), full)
        forward_tokens(model, ids, 0, model.new_cache(1, 10), RouterPolicy(r, 1.0, 2), never)
        forward_tokens(model, ids, 0, model.new_cache(1, 10), Static(2, L), static)
    assert full.layer_macs == never.layer_macs == full.full_macs - full.head_macs and full.router_macs == 0
    assert never.router_macs == 10 * (L - 2) * r.macs() and never.layers == full.layers == 10 * L
    assert static.layers == 20 and static.fill_macs == 10 * (L - 2) * c.dim * 2 * c.kv_dim
    assert static.layer_macs * L == full.layer_macs * 2  # every token ran 2 of L layers


def weights_of_a_layer(c):
    return c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim


def test_a_decode_step_reads_each_layer_it_runs_once_and_the_cache_up_to_itself(tiny):
    """One token at position 6 exiting at k reads k layers' weights, the K/V columns of the other
    L - k (its fill), the LM head, and at each of its k layers the K/V of 7 positions; full depth
    would have read all L layers' and their caches. 4 bytes an element in float32."""
    model, *_ = tiny
    c, L, k = model.config, model.config.n_layers, 2
    ids, cache, stats = prompt(model, 7), model.new_cache(1, 7), Stats()
    with torch.no_grad():
        forward_tokens(model, ids[:6], 0, cache, FullDepth(), Stats())
        forward_tokens(model, ids[6:], 6, cache, Static(k, L), stats)
    kv_layer, head = 7 * 2 * c.kv_dim * 4, c.dim * c.vocab_size * 4
    fill = (L - k) * c.dim * 2 * c.kv_dim
    assert stats.weight_bytes == 4 * (k * weights_of_a_layer(c) + fill) + head
    assert stats.kv_bytes == k * kv_layer
    assert stats.full_bytes == 4 * L * weights_of_a_layer(c) + head + L * kv_layer


def test_a_prefill_with_exits_reads_a_layer_once_whatever_its_rows(tiny):
    """Ten tokens, two leaving at 1 and three at 2, the rest at L: every layer runs, its weights
    read once; the decoupled fill reads K/V columns of L - 1 layers for the first exit and L - 2
    for the second; the confidence gate reads the LM head at each layer it is asked (1..L-1)."""
    model, *_ = tiny
    c, L = model.config, model.config.n_layers
    stats, gate = Stats(), Stats()
    with torch.no_grad():
        forward_tokens(model, prompt(model, 10), 0, model.new_cache(1, 10),
                       Pattern([1, 2, 2, L, 1, 2, L, L, L, L]), stats)
        forward_tokens(model, prompt(model, 10), 0, model.new_cache(1, 10), Confidence(1.0), gate)
    head = c.dim * c.vocab_size * 4
    assert stats.weight_bytes == 4 * (L * weights_of_a_layer(c)
                                      + (2 * L - 3) * c.dim * 2 * c.kv_dim) + head
    assert stats.kv_bytes == L * 10 * 2 * c.kv_dim * 4
    assert stats.full_bytes == 4 * L * weights_of_a_layer(c) + head + stats.kv_bytes
    assert gate.weight_bytes == 4 * L * weights_of_a_layer(c) + head + (L - 1) * head


def test_a_prompt_policy_reads_each_policy_up_to_its_own_tokens(tiny):
    """Prompt tokens leave at layer 1 by the confidence gate (threshold 0: its head read once),
    the read position runs all L layers at full depth (no weights of its own): the gate's head
    is not charged at the layers only the read position ran."""
    model, *_ = tiny
    c, L, stats = model.config, model.config.n_layers, Stats()
    with torch.no_grad():
        forward_tokens(model, prompt(model, 10), 0, model.new_cache(1, 10),
                       PromptPolicy(Confidence(0.0), FullDepth(), read=9), stats)
    head = c.dim * c.vocab_size * 4  # read twice: the logits, and the gate at layer 1
    fill = (L - 1) * c.dim * 2 * c.kv_dim  # the prompt tokens' K/V at layers 2..L
    assert stats.weight_bytes == 4 * (L * weights_of_a_layer(c) + fill) + 2 * head


def router_file(model, path, **meta):
    c = model.config
    r = Router(c)
    save_router(r, path, {"base_model": model_id(model), "n_layers": c.n_layers, "dim": c.dim, "threshold": 0.7,
                  "lam": 1.0, "beta": 1.0} | meta)
    return r


def test_router_file_round_trips_and_runs(tiny, tmp_path):
    model, *_ = tiny
    r = router_file(model, tmp_path / "r.safetensors")
    loaded = load_router(tmp_path / "r.safetensors", model)
    assert loaded.meta["threshold"] == "0.7"
    for name, t in r.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name])
    policy = make_policy("router", model, exits=tmp_path / "r.safetensors")
    assert policy.threshold == 0.7
    ids = prompt(model, 6).tolist()
    g, want = generate(model, ids, 4, policy), generate(model, ids, 4, RouterPolicy(r, threshold=0.7))
    assert g.tokens == want.tokens and g.exit_layers == want.exit_layers  # the file decides as the router it was saved from
    assert len(g.tokens) == 4 and all(1 <= e <= model.config.n_layers for e in g.exit_layers)


def test_router_for_another_model_is_refused(tiny, tmp_path):
    model, *_ = tiny
    router_file(model, tmp_path / "other.safetensors", base_model="SmolLM2-1.7B:0123456789ab")
    with pytest.raises(UserError, match="was made for SmolLM2-1.7B.* not for this model"):
        load_router(tmp_path / "other.safetensors", model)
    r = router_file(model, tmp_path / "other-features.safetensors")
    save_file(r.state_dict(), str(tmp_path / "other-features.safetensors"), metadata=r.meta | {"features": "h|q"})
    with pytest.raises(UserError, match="uses features"):
        load_router(tmp_path / "other-features.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable router file"):
        load_router(tmp_path / "junk.safetensors", model)


def test_kv_fill_modes(tiny):
    """sequential fill = decoupled fill through the whole generation; 'none' leaves skipped slots empty and masked."""
    model, *_ = tiny
    L, ids = model.config.n_layers, prompt(model, 10).tolist()
    pattern = Pattern([2, L, 1, 3, L, 2, 4, 1, L, 5] + [3] * 6)
    runs = {fill: generate(model, ids, 6, pattern, kv_fill=fill) for fill in ("decoupled", "sequential", "none")}
    assert runs["decoupled"].tokens == runs["sequential"].tokens
    assert runs["none"].decode.fill_macs == 0 and runs["decoupled"].decode.fill_macs > 0
    cache = model.new_cache(1, 10, mask_unwritten=True)
    with torch.no_grad():
        logits, _ = forward_tokens(model, prompt(model, 10), 0, cache, pattern, Stats(), logits="all", kv_fill="none")
    assert torch.isfinite(logits).all()
    assert cache.written[:, 2].tolist() == [True] + [False] * (L - 1)  # token 2 exited at layer 1: nothing above
    decoupled, _, _ = run(model, prompt(model, 10), pattern)
    assert not torch.allclose(logits, decoupled)  # later tokens lost the skipped layers' keys
    # with nothing skipped, the modes agree exactly
    full_none = generate(model, ids, 4, FullDepth(), kv_fill="none")
    assert full_none.tokens == generate(model, ids, 4, FullDepth()).tokens


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="static", exit_layer=0), "static exit layer 0 is out of range"),
    (dict(name="static", exit_layer=-3), "static exit layer -3 is out of range"),
    (dict(name="static", exit_layer=7), "static exit layer 7 is out of range"),
    (dict(name="static", exit_layer=3, min_layer=4), "--min-layer does nothing with --policy static"),
    (dict(name="static", threshold=0.5), "--threshold does nothing with --policy static"),
    (dict(name="full", threshold=0.5), "--threshold does nothing with --policy full"),
    (dict(name="full", min_layer=3), "--min-layer does nothing with --policy full"),
    (dict(name="confidence", exit_layer=3), "--exit-layer does nothing with --policy confidence"),
    (dict(name="entropy", exits="r.safetensors"), "--exits does nothing with --policy entropy"),
    (dict(name="confidence", threshold=float("nan")), "confidence threshold nan is out of range"),
    (dict(name="confidence", min_layer=0), "--min-layer 0 is out of range"),
])
def test_policy_settings_out_of_range_or_unused_are_errors(tiny, kwargs, message):
    with pytest.raises(UserError, match=message):
        make_policy(model=tiny[0], **kwargs)


def damage(path, **change):
    """Rewrite a router file with some tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors | change, str(path), metadata=meta)


@pytest.mark.parametrize("change", ["nan", "shape", "int"])
def test_damaged_router_files_are_refused(tiny, tmp_path, change):
    model, *_ = tiny
    r = router_file(model, tmp_path / "r.safetensors")
    w2 = r.w2.detach().clone()
    bad = {"nan": w2.index_fill(1, torch.tensor([0]), float("nan")), "shape": w2[:, :5].contiguous(), "int": w2.long()}[change]
    damage(tmp_path / "r.safetensors", w2=bad)
    with pytest.raises(UserError, match="is damaged: tensor w2"):
        load_router(tmp_path / "r.safetensors", model)


def test_router_metadata_that_does_not_parse_is_refused(tiny, tmp_path):
    model, *_ = tiny
    router_file(model, tmp_path / "r.safetensors", threshold="high")
    with pytest.raises(UserError, match="malformed metadata"):
        load_router(tmp_path / "r.safetensors", model)


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_dense_forward_with_exits_equals_forward_tokens(request, which):
    """model.forward(ids, exit_layer) is the autograd-friendly form of the same computation: every token
    runs every layer but keeps h_e after its exit, so its deeper K/V are the decoupled fill of h_e."""
    model = request.getfixturevalue(which)[0]
    L = model.config.n_layers
    pattern = [L, 2, 3, L, 1, 5, L, 2, 6, 4, 1, L] if L == 6 else [30, 12, 24, 30, 8, 18, 27, 30, 20, 10, 29, 30]
    ids = prompt(model, len(pattern))
    adept_logits, exits, _ = run(model, ids, Pattern(pattern))
    with torch.no_grad():
        dense = model(ids[None], exit_layer=torch.tensor([pattern]))[0]
    assert exits.tolist() == pattern
    torch.testing.assert_close(dense, adept_logits, **(TOL if L == 6 else TOL_DEFAULT))
