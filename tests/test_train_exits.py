"""Training the exit router: soft labels, loss, artifact, resume."""
import math
import re

import pytest
import torch

from adept import Router, RouterPolicy, generate
from checkpoint import model_id
from checkpoint import UserError, load_router, save_router
from data import save_atomic
from train_exits import preference_labels, targets, train


def test_soft_labels_by_hand():
    # L = 3, λ = 2, β = 3, so C = (1/3, 2/3, 1) and β·C = (1, 2, 3).
    # token a: T = (0, 1, 1) -> R = (-1, 0, -1);  token b: T = (1, 0, 1) -> R = (1, -2, -1)
    T = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    labels = preference_labels(T, lam=2.0, beta=3.0)
    s = lambda x: 1 / (1 + math.exp(-x))
    expected = [[s(-1 - 0), s(1 - (-1))],     # layer 1: R(1) − max(R(2), R(3))
                [s(0 - (-1)), s(-2 - (-1))]]  # layer 2: R(2) − R(3)
    torch.testing.assert_close(labels, torch.tensor(expected), atol=1e-6, rtol=0)


def tiny_targets(tiny, n_seqs=6, length=24):
    model, *_ = tiny
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist(), 4) for _ in range(n_seqs)]
    feats, T = targets(model, seqs)
    router = Router(model.config, hidden=8)
    router.mu[:-1], router.sd[:-1] = feats.mean(1), feats.std(1) + 1e-6
    return model, router, feats, preference_labels(T, 4.0, 1.0), T


def test_targets_have_one_row_per_layer_and_token(tiny):
    model, _, feats, labels, T = tiny_targets(tiny)
    L, c = model.config.n_layers, model.config
    assert feats.shape == (L - 1, 6 * 20, 2 * c.dim + 2 * c.kv_dim)
    assert T.shape == (L, 120) and bool((T[-1] == 1).all())  # the last layer always agrees with itself
    assert labels.shape == (L - 1, 120) and bool(((labels > 0) & (labels < 1)).all())


def test_training_lowers_the_loss(tiny):
    _, router, feats, labels, _ = tiny_targets(tiny)
    torch.manual_seed(0)
    losses = train(router, feats, labels, epochs=30, lr=1e-2, batch=32, progress=False)
    assert losses[-1] < 0.9 * losses[0]


def test_interrupted_and_resumed_training_equals_uninterrupted(tiny, tmp_path):
    _, base, feats, labels, _ = tiny_targets(tiny)

    def copy():
        r = Router(tiny[0].config, hidden=8)
        r.load_state_dict(base.state_dict())
        return r
    a, b = copy(), copy()
    train(a, feats, labels, epochs=4, batch=32, seed=1, progress=False)
    ckpt = tmp_path / "resume.pt"
    recipe = {"lam": 4.0, "beta": 1.0}
    train(b, feats, labels, epochs=4, batch=32, seed=1, ckpt=ckpt, stop_after=2, progress=False, recipe=recipe)  # interrupted
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    with pytest.raises(UserError, match=r"other settings \(\{'lam': 4.0\}\)"):  # never resumed with other settings
        train(copy(), feats, labels, epochs=4, batch=32, seed=1, ckpt=ckpt, progress=False, recipe=recipe | {"lam": 8.0})
    b2 = copy()  # a fresh process: nothing but the checkpoint carries over
    train(b2, feats, labels, epochs=4, batch=32, seed=1, ckpt=ckpt, progress=False, recipe=recipe)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b2.state_dict()[name]), name


def test_an_interrupted_save_leaves_the_previous_file_untouched(tmp_path, monkeypatch):
    """A save interrupted half-way through writing never reaches the file's own path."""
    path = tmp_path / "ck.pt"
    save_atomic({"x": torch.ones(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert not (tmp_path / "ck.pt.tmp").exists()
    before = path.read_bytes()
    real_save = torch.save

    def save_then_interrupt(obj, f):  # half of the bytes written, then Ctrl-C
        real_save(obj, f)
        data = open(f, "rb").read()
        open(f, "wb").write(data[:len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == before  # the old checkpoint, whole
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"x": torch.zeros(3)}, tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists()  # no half-written file under the name a resume would read
    monkeypatch.setattr(torch, "save", real_save)
    save_atomic({"x": torch.zeros(3)}, path)  # the next save replaces a stale half-written temporary
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.zeros(3))
    assert not (tmp_path / "ck.pt.tmp").exists()


def test_trained_router_round_trips_and_drives_generation(tiny, tmp_path):
    model, router, feats, labels, _ = tiny_targets(tiny)
    train(router, feats, labels, epochs=2, batch=32, progress=False)
    path = tmp_path / "router.safetensors"
    save_router(router, path, {"base_model": model_id(model), "n_layers": model.config.n_layers, "dim": model.config.dim,
                       "threshold": 0.3, "lam": 4.0, "beta": 1.0})
    loaded = load_router(path, model)
    assert loaded.meta["lam"] == "4.0" and loaded.meta["threshold"] == "0.3"
    x = feats[2, :5]
    torch.testing.assert_close(loaded(3, x), router(3, x), atol=0, rtol=0)
    g = generate(model, [3, 4, 5], 4, RouterPolicy(loaded))
    assert len(g.exit_layers) == 4


def test_batched_sampling_equals_one_prompt_at_a_time(tiny):
    """Left padding must not change what a prompt generates (greedy, so the tokens are comparable)."""
    from adept import FullDepth
    from data import sample_batch
    model, *_ = tiny
    prompts = [[5, 9, 14], [7, 3, 22, 40, 41, 2, 11], [30]]
    batched = sample_batch(model, prompts, 6, eos_ids=set(), seed=0, temperature=0)
    for p, toks in zip(prompts, batched):
        assert toks == generate(model, p, 6, FullDepth()).tokens


def test_train_exits_command_end_to_end(tiny, tmp_path, monkeypatch):
    """Train, write the router with its metadata, evaluate, refuse to overwrite; then --eval reloads it."""
    import json
    from conftest import TEXT
    from train_exits import main
    model, *_, ckpt = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "r.safetensors"
    cmd = ["--checkpoint", str(ckpt), "--out", str(out), "--data", str(tmp_path / "text.txt"), "--max-new-tokens", "12",
           "--epochs", "2", "--min-layer", "2", "--json", str(tmp_path / "eval.json")]
    run = lambda *extra: main(cmd + list(extra))
    run()
    loaded = load_router(out, model)
    assert loaded.meta["min_layer"] == "2" and loaded.meta["lam"] == "4.0"
    ev = json.loads((tmp_path / "eval.json").read_text())
    records = ev["records"]
    assert {r["scenario"] for r in records} == {"eval-generated", "eval-human"}
    assert all(r["model"] == "base" and r["reference"] == "base" and r["agreement_lo"] <= r["agreement"] <= r["agreement_hi"]
               for r in records)
    assert any(r["policy"] == "router" and r["setting"] == float(loaded.meta["threshold"]) for r in records)
    full = [r for r in records if r["policy"] == "full"]
    assert len(full) == 2 and all(r["agreement"] == 1 and r["kl"] == pytest.approx(0, abs=1e-6) for r in full)
    with pytest.raises(UserError, match="exists; pass --force"):
        run()
    run("--eval")
    # the fill calibration beside it, and a router for prompt tokens, from the same text
    run("--calibrate")
    from checkpoint import load_fill
    mu = load_fill(model, tmp_path / "r.fill.safetensors").fill_mu
    model.fill_mu = None
    assert mu.shape == (model.config.n_layers + 1, model.config.dim) and not torch.equal(mu[0], mu[-1])
    with pytest.raises(UserError, match="exists; pass --force"):  # it exists: --force
        run("--calibrate")
    prompt_out = str(tmp_path / "p.safetensors")
    main([*cmd[:cmd.index("--out") + 1], prompt_out, *cmd[cmd.index("--out") + 2:], "--target", "prompt"])
    assert load_router(prompt_out, model).meta["target"] == "prompt"


# What train_exits.py's wrapper prints as one "error:" line (UserError; a ValueError the mechanism raises for an
# argument it refuses by name). Checked in-process; the wrapper itself by test_train_exits_cli_reports_bad_input_in_one_line.
CLI_ERRORS = (UserError, ValueError)


def run_train_exits(ckpt, tmp_path, monkeypatch, *args):
    """train_exits.main in this process, run from tmp_path as the command would be."""
    from train_exits import main
    monkeypatch.chdir(tmp_path)
    return main(["--checkpoint", str(ckpt), *args])


def test_train_exits_cli_reports_bad_input_in_one_line(tiny, tmp_path):
    """The one subprocess test of train_exits.py: a refusal is one 'error:' line on stderr, no traceback."""
    import subprocess
    import sys
    from pathlib import Path
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "train_exits.py"), "--checkpoint", str(tiny[4]),
           "--out", "r.st", "--lam", "-1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--lam must be > 0" in lines[0], r.stderr


@pytest.mark.parametrize("args,message", [
    (["--out", "r.st", "--data", "missing.txt"], "--data file missing.txt not found"),
    (["--out", "r.st", "--eval", "--data", "missing.txt"], "--data file missing.txt not found"),
    (["--out", "r.st", "--data", "."], "--data . is a directory"),
    (["--out", "r.st", "--json", "no/such/dir/e.json"], "the folder no/such/dir does not exist"),
    (["--out", "r.st", "--json", "."], "--json . is a directory"),
    (["--out", "no/such/dir/r.st"], "the folder no/such/dir does not exist"),
    (["--out", "r.st", "--eval-chunks", "0"], "--eval-chunks must be >= 1"),
    (["--out", "r.st", "--lam", "-1"], "--lam must be > 0"),
    (["--out", "r.st", "--beta", "nan"], "--beta must be > 0"),
    (["--out", "r.st", "--seed", str(2 ** 70)], "--seed must be in"),
    (["--out", "r.st", "--min-layer", "0"], "--min-layer 0 is out of range"),
    (["--out", "r.st", "--no-router"], "--no-router belongs to --eval"),
    (["--out", "r.st", "--tune"], "exit tuning has its own command: python tune_exits.py"),
    (["--out", "r.st", "--calibrate", "--eval"], "--eval and --calibrate are separate runs"),
    (["--out", "r.st", "--target", "prompt", "--eval"], "--eval and --target prompt are separate runs"),
    (["--out", "r.st", "--eval", "--fill", "missing.safetensors"], "fill calibration file missing.safetensors not found"),
])
def test_train_exits_bad_input_fails_before_any_work(tiny, tmp_path, monkeypatch, capsys, args, message):
    with pytest.raises(CLI_ERRORS, match=re.escape(message)):
        run_train_exits(tiny[4], tmp_path, monkeypatch, *args)
    out = capsys.readouterr()
    assert "generating" not in out.err + out.out and not list(tmp_path.glob("runs/generated-*"))  # no minute-long work started


def test_too_little_text_for_a_held_out_set_is_one_error(tiny, tmp_path, monkeypatch):
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(UserError, match="no held-out human text"):
        run_train_exits(tiny[4], tmp_path, monkeypatch, "--out", "r.st", "--data", "short.txt", "--max-new-tokens", "8")


def test_cached_generated_text_is_keyed_by_what_determines_it(tiny, tmp_path):
    """Changing the seed or the length generates anew; --data and the chunk counts never reuse stale text."""
    import argparse
    from data import generated_text
    from train_exits import build_data
    model, tok, *_ = tiny
    a = generated_text(model, tok, 0, 8, runs=tmp_path)
    assert generated_text(model, tok, 0, 8, runs=tmp_path) == a and len(list(tmp_path.glob("generated-*"))) == 1
    generated_text(model, tok, 1, 8, runs=tmp_path)
    generated_text(model, tok, 0, 9, runs=tmp_path)
    assert len(list(tmp_path.glob("generated-*"))) == 3
    args = lambda texts, eval_chunks: argparse.Namespace(seed=0, max_new_tokens=8, data=texts, data_texts=texts,
                                                        human_chunks=40, eval_chunks=eval_chunks)
    from conftest import TEXT
    one, two = build_data(model, tok, args([TEXT], 2)), build_data(model, tok, args([TEXT[::-1]], 3))
    assert one["heldout_human"] != two["heldout_human"] and len(two["heldout_human"]) == 3


@pytest.mark.parametrize("args,message", [
    (["--out", "d.st", "--dtype", "bfloat16"], "exit tuning trains in float32"),
    (["--out", "d.st", "--rank", "0"], "--rank must be >= 1"),
    (["--out", "d.st", "--exit-rate", "2"], "--exit-rate must be in [0, 1]"),
    (["--out", "d.st", "--steps", "0"], "--steps must be >= 1"),
    (["--tuning-out", "no/such/dir/d.st"], "the folder no/such/dir does not exist"),
    ([], "with --checkpoint, name the delta file to write with --out"),
])
def test_tune_exits_bad_input_fails_before_any_work(tiny, tmp_path, monkeypatch, args, message):
    from tune_exits import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLI_ERRORS, match=re.escape(message)):
        main(["--checkpoint", str(tiny[4]), *args])
    assert not list(tmp_path.glob("runs/generated-*"))


def test_tune_exits_cli_reports_bad_input_in_one_line(tiny, tmp_path):
    """The one subprocess test of tune_exits.py: a refusal is one 'error:' line on stderr, no traceback."""
    import subprocess
    import sys
    from pathlib import Path
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "tune_exits.py"), "--checkpoint",
           str(tiny[4]), "--tuning-out", "d.st", "--rank", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0] == "error: --rank must be >= 1, got 0", r.stderr
