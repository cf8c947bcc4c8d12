"""Exit tuning: low-rank deltas trained through the ADEPT path (tune_exits.py)."""
import argparse

import pytest
import torch

from adept import Router
from checkpoint import model_id
from checkpoint import load
from checkpoint import UserError, load_router, save_router
from checkpoint import load_tuning, save_tuning
from tune_exits import add_deltas, merge_deltas, tune, tuning_loss


def tiny_model(tiny):
    return load(tiny[4])[0]  # a fresh copy: deltas change the model they are put on


def randomise(deltas, std=0.05):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for d in deltas.values():
            d.B.copy_(torch.randn(d.B.shape, generator=g) * std)


def test_a_zero_delta_is_the_base_model_bit_for_bit(tiny):
    model = tiny_model(tiny)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
        add_deltas(model, rank=4, alpha=8)
        assert torch.equal(model(ids), base)


def test_merged_weights_equal_the_delta_applied_on_the_fly(tiny):
    model = tiny_model(tiny)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    randomise(add_deltas(model, rank=4, alpha=8))
    with torch.no_grad():
        on_the_fly = model(ids)
        merge_deltas(model)
        assert not hasattr(model, "parametrizations") or not model.parametrizations
        torch.testing.assert_close(model(ids), on_the_fly, atol=1e-5, rtol=1e-5)


def test_a_gradient_reaches_the_delta_through_the_fill(tiny):
    """Token 0 exits at layer 1; only token 1 is scored. Part of the gradient on layer 1's delta flows through
    token 0's exit state and its filled K/V at layers 2..L: blocking that path (detaching the kept h_e) changes it."""
    model = tiny_model(tiny)
    L = model.config.n_layers
    deltas = add_deltas(model, rank=4, alpha=8, targets=("w13",))
    randomise(deltas)
    ids, exit_layer = torch.tensor([[5, 9, 14]]), torch.tensor([[1, L, L]])

    def grad(block_fill):
        deltas["w13"].B.grad = None
        pos, h = torch.arange(3), model.tok_emb[ids]
        mask, cache = pos[:, None] >= pos[None], __import__("kv_cache").SequenceCache()
        for i in range(L):  # model.forward's loop, with the kept h_e optionally cut from the graph
            h_next, _ = model.layer(i, h, pos, cache, mask)
            h = torch.where((exit_layer > i)[..., None], h_next, h.detach() if block_fill else h)
        logits = model.head(h)
        logits[0, 1].logsumexp(-1).backward()
        return deltas["w13"].B.grad[0].clone(), logits.detach()

    with_fill, logits = grad(False)
    with torch.no_grad():  # the loop above is model.forward's
        torch.testing.assert_close(logits, model(ids, exit_layer), atol=0, rtol=0)
    assert with_fill.abs().sum() > 0
    assert not torch.allclose(with_fill, grad(True)[0])


def tune_args(**over):
    return argparse.Namespace(**({"seed": 0, "rank": 4, "alpha": 8.0, "tune_lr": 3e-3, "tune_steps": 12, "tune_batch": 2,
                                  "exit_layers": [2, 5], "exit_rate": 0.5, "final_weight": 4.0, "no_fill": False,
                                  "eval_every": 4} | over))


def windows(model, n, length=16, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("no_fill", [False, True], ids=["adept-path", "no-fill-ablation"])
def test_tuning_lowers_its_loss(tiny, no_fill):
    model = tiny_model(tiny)
    train, args = windows(model, 4), tune_args(no_fill=no_fill, tune_steps=40)
    exit_layer = torch.tensor([[2, 6, 3, 6, 5, 6, 6, 4] * 2] * 4)
    deltas, _ = tune(model, train, windows(model, 2, seed=1), args, progress=False)
    after = tuning_loss(model, deltas, train, exit_layer, 4.0, fill=not no_fill)[0].item()
    torch.manual_seed(0)
    fresh = tiny_model(tiny)
    d0 = add_deltas(fresh, 4, 8.0)
    before = tuning_loss(fresh, d0, train, exit_layer, 4.0, fill=not no_fill)[0].item()
    assert after < 0.7 * before


def test_interrupted_and_resumed_tuning_equals_uninterrupted(tiny, tmp_path):
    train, val = windows(tiny[0], 6), windows(tiny[0], 2, seed=1)
    a, _ = tune(tiny_model(tiny), train, val, tune_args(), progress=False)
    ckpt = tmp_path / "resume.pt"
    tune(tiny_model(tiny), train, val, tune_args(), ckpt=ckpt, stop_after=5, progress=False)          # interrupted
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    b, log = tune(tiny_model(tiny), train, val, tune_args(), ckpt=ckpt, progress=False)               # a fresh process
    assert [r["step"] for r in log] == [0, 4, 8, 12]
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B), name
    tune(tiny_model(tiny), train, val, tune_args(), ckpt=ckpt, stop_after=5, progress=False)
    with pytest.raises(UserError, match=r"other settings \(\{'tune_lr': 0.003\}\)"):   # never resumed with other settings
        tune(tiny_model(tiny), train, val, tune_args(tune_lr=1e-3), ckpt=ckpt, progress=False)


def test_delta_file_round_trip_and_refusals(tiny, tmp_path):
    model = tiny_model(tiny)
    base_id = model_id(model)
    deltas = add_deltas(model, rank=4, alpha=8)
    randomise(deltas)
    save_tuning(deltas, tmp_path / "d.safetensors", {"base_model": base_id, "rank": 4, "alpha": 8.0, "targets": ",".join(deltas)})
    ids = windows(model, 1)
    with torch.no_grad():
        on_the_fly = model(ids)
    tuned = load_tuning(load(tiny[4])[0], tmp_path / "d.safetensors")
    with torch.no_grad():  # stored in bfloat16: the merged model is the trained one to bf16 precision
        torch.testing.assert_close(tuned(ids), on_the_fly, atol=2e-2, rtol=2e-2)
    assert model_id(tuned) != base_id and tuned.tuning["rank"] == "4"
    # a router trained on the base model is refused on the tuned one, and the other way round
    c = tuned.config
    save_router(Router(c), tmp_path / "r.safetensors", {
        "base_model": base_id, "n_layers": c.n_layers, "dim": c.dim, "threshold": 0.5, "lam": 4.0, "beta": 1.0})
    with pytest.raises(UserError, match="not for this model"):
        load_router(tmp_path / "r.safetensors", tuned)
    # a delta made for other weights is refused
    save_tuning(deltas, tmp_path / "other.safetensors", {"base_model": "other:0123456789ab", "rank": 4, "alpha": 8.0,
                                                         "targets": ",".join(deltas)})
    with pytest.raises(UserError, match="was made for other:0123456789ab, not for this model"):
        load_tuning(load(tiny[4])[0], tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="tuning file .* not found"):
        load_tuning(load(tiny[4])[0], tmp_path / "missing.safetensors")
    # a damaged delta is refused whole: the weights it did name stay as they were
    for bad in ({"rank": 3}, {"targets": "wo,nosuch"}):
        meta = {"base_model": base_id, "rank": 4, "alpha": 8.0, "targets": ",".join(deltas)} | bad
        save_tuning(deltas, tmp_path / "bad.safetensors", meta)
        fresh = load(tiny[4])[0]
        wo = fresh.wo.clone()
        with pytest.raises(UserError, match="is damaged or not a tuning file"):
            load_tuning(fresh, tmp_path / "bad.safetensors")
        assert torch.equal(fresh.wo, wo)


def test_tune_then_router_on_the_tuned_model_end_to_end(tiny, tmp_path, monkeypatch):
    """tune_exits.py writes a delta; a router trained with --tuning is measured against the base model's full depth."""
    import json
    import bench
    import train_exits
    import tune_exits
    from conftest import TEXT
    monkeypatch.chdir(tmp_path)  # both commands run in-process; their one-line error wrappers have their own tests
    (tmp_path / "text.txt").write_text(TEXT)
    cmd = ["--checkpoint", str(tiny[4]), "--data", str(tmp_path / "text.txt"), "--max-new-tokens", "12",
           "--min-layer", "2"]
    run = lambda *extra: train_exits.main(cmd + list(extra))
    tune_exits.main(["--checkpoint", str(tiny[4]), "--data", str(tmp_path / "text.txt"), "--gen-tokens", "12",
                     "--gen-seeds", "1", "--tuning-out", "d.safetensors", "--tune-steps", "4", "--tune-len", "32",
                     "--eval-every", "2", "--json", "tune.json"])
    curve = json.loads((tmp_path / "tune.json").read_text())["learning_curve"]
    assert [p["step"] for p in curve] == [0, 2, 4] and curve[0]["final"] == 1.0  # step 0 is the base model itself
    stored = json.loads((tmp_path / "tune.json").read_text())["stored_bf16"]
    assert abs(stored["final"] - curve[-1]["final"]) <= 0.1  # bf16 storage changes agreement by little
    run("--tuning", "d.safetensors", "--out", "r.safetensors", "--epochs", "1", "--json", "eval.json")
    records = json.loads((tmp_path / "eval.json").read_text())["records"]
    for scenario in ("eval-generated", "eval-human"):
        full = [(x["model"], x["reference"]) for x in records if x["scenario"] == scenario and x["policy"] == "full"]
        assert full == [("base", "base"), ("tuned", "base")]
    assert all(x["reference"] == "base" for x in records)
    assert {x["model"] for x in records if x["policy"] == "router"} == {"tuned"}
    with pytest.raises(UserError, match="not for this model"):  # the router for the tuned model, on the base model
        run("--out", "r.safetensors", "--eval")
    # frozen vs tuned in one bench run: every figure against the base model's full depth
    bench.main(["--quick", "--checkpoint", str(tiny[4]), "--tuning", "d.safetensors", "--tuned-exits", "r.safetensors",
                "--json", "bench.json"])
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert all(x["reference"] == "base" for x in records)
    for scenario in ("decode", "decode-tf", "prefill-64"):
        rows = {(x["model"], x["policy"]) for x in records if x["scenario"] == scenario}
        assert {("base", "full"), ("tuned", "full"), ("tuned", "static"), ("tuned", "router")} <= rows
        assert ("tuned", "entropy") not in rows  # the gates are measured on the base model only
    assert all(x["agreement"] == 1 for x in records if (x["model"], x["policy"]) == ("base", "full"))
