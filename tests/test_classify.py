"""Classification with exit classifiers: a head per layer on a document's pooled features.

- The features a document's head reads through `forward_tokens` equal those of the dense
  pass under the same exit pattern (calibrated fill included).
- A document that stops at layer e computes exactly layers 1..e: no layer above, no fill above;
  tokens that leave earlier get only the K/V of the layers that still run.
- The gates decide where the dense features say they would.
- Classifier files round-trip exactly and are refused for another model or when damaged.
- Labelled folders: one line for each bad input.
"""
import pytest
import torch

import adept
import kv_cache
from adept import (DocumentExit, ExitClassifier, FullDepth, MaxProb, Patience, Policy, PromptPolicy, Router,
                   RouterGate, Static, Stats, classify, forward_tokens, pooled)
from checkpoint import load_classifier, read_labelled, save_classifier
from checkpoint import UserError

TOL = dict(atol=1e-5, rtol=1e-5)
LABELS = ["business", "sport", "tech"]


class Pattern(Policy):
    """Token at position p exits at layer exit_at[p]."""
    def __init__(self, exit_at):
        self.exit_at = torch.tensor(exit_at)

    def decide(self, model, i, pos, h, q, k, v):
        return self.exit_at[pos] == i


def random_classifier(model, seed=0, router=False):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    clf = ExitClassifier(c, LABELS)
    with torch.no_grad():
        clf.w.copy_(torch.randn(clf.w.shape, generator=g))
        clf.b.copy_(torch.randn(clf.b.shape, generator=g))
        clf.mu.copy_(torch.randn(clf.mu.shape, generator=g) * 0.1)
        clf.sd.copy_(torch.rand(clf.sd.shape, generator=g) + 0.5)
    if router:
        clf.router = Router(c, 4, n_features=c.dim + len(LABELS))
    return clf


def document(model, n=12, seed=0):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def dense_features(model, ids, exit_at=None):
    """Pooled features [L, D] of every layer from the dense pass (model.forward) under an exit pattern."""
    hs = []
    with torch.no_grad():
        model(ids[None], exit_layer=None if exit_at is None else torch.tensor([exit_at]), hidden_states=hs)
    return torch.stack([pooled(model, h[0]) for h, *_ in hs])


@pytest.mark.parametrize("calibrated", [False, True])
def test_features_through_forward_tokens_equal_the_dense_pass(tiny, calibrated):
    model, L = tiny[0], tiny[0].config.n_layers
    model.fill_mu = torch.randn(L + 1, model.config.dim) * 0.1 if calibrated else None
    try:
        ids, d = document(model), 4
        exit_at = [2, 1, 3, 4, 2, 4, 1, 3, 4, 2, 4, 4]  # tokens leave at 1..3; the document stops at d
        h, e = forward_tokens(model, ids, 0, model.new_cache(1, len(ids)), Pattern(exit_at), Stats(),
                              logits=None, kv_fill="lazy")
        assert e.tolist() == exit_at
        torch.testing.assert_close(pooled(model, h), dense_features(model, ids, exit_at)[d - 1], **TOL)
        clf = random_classifier(model)
        p, layer = classify(model, clf, ids, Pattern(exit_at), Stats())
        assert layer == d
        torch.testing.assert_close(p, clf(d, dense_features(model, ids, exit_at)[d - 1]).softmax(-1), **TOL)
    finally:
        model.fill_mu = None


def test_full_depth_classification_reads_the_last_layer(tiny):
    model = tiny[0]
    clf, ids = random_classifier(model), document(model)
    p, d = classify(model, clf, ids, FullDepth(), Stats())
    assert d == model.config.n_layers
    torch.testing.assert_close(p, clf(d, dense_features(model, ids)[-1]).softmax(-1), **TOL)


def count_calls(monkeypatch, model):
    """Which layers ran and which were filled, as (kind, layer) pairs."""
    calls, layer = [], model.layer

    def run(i, *a):
        calls.append(("layer", i))
        return layer(i, *a)

    def fill_layer(cache, m, h, pos, e, i):
        calls.append(("fill", i))
        kv_cache.fill_layer(cache, m, h, pos, e, i)
    monkeypatch.setattr(model, "layer", run)
    monkeypatch.setattr(adept, "fill_layer", fill_layer)
    monkeypatch.setattr(adept, "fill_decoupled", lambda *a: calls.append(("fill all", a[-1])))
    monkeypatch.setitem(adept.KV_FILLS, "decoupled", adept.fill_decoupled)
    return calls


def test_a_document_that_stops_at_e_runs_layers_1_to_e_and_fills_nothing(tiny, monkeypatch):
    model, e = tiny[0], 3
    calls = count_calls(monkeypatch, model)
    stats = Stats()
    _, d = classify(model, random_classifier(model), document(model), Static(e, model.config.n_layers), stats)
    assert d == e
    assert calls == [("layer", i) for i in range(e)]
    assert stats.fill_macs == 0 and stats.layers == e * len(document(model))


def test_tokens_that_leave_early_are_filled_only_where_others_still_run(tiny, monkeypatch):
    model = tiny[0]
    calls = count_calls(monkeypatch, model)
    exit_at = [1] * 6 + [4] * 6  # half the tokens leave after layer 1, the rest at 4
    stats = Stats()
    classify(model, random_classifier(model), document(model), Pattern(exit_at), stats)
    assert [c for c in calls if c[0] != "layer"] == [("fill", 1), ("fill", 2), ("fill", 3)]  # layers 2..4, 0-indexed
    c = model.config
    assert stats.fill_macs == 6 * 3 * c.dim * 2 * c.kv_dim


def test_lazy_fill_gives_the_outputs_of_the_decoupled_fill(tiny):
    model, ids = tiny[0], document(model=tiny[0])
    exit_at = [2, 1, 3, 6, 2, 5, 1, 3, 6, 2, 5, 4]
    out = {}
    for fill in ("lazy", "decoupled"):
        out[fill] = forward_tokens(model, ids, 0, model.new_cache(1, len(ids)), Pattern(exit_at), Stats(),
                                   logits="all", kv_fill=fill)[0]
    torch.testing.assert_close(out["lazy"], out["decoupled"], **TOL)


@torch.no_grad()
def first_settled(model, clf, ids, settled):
    """The layer a gate should stop at, from the dense pass's features: settled(i, x, p) per layer."""
    feats = dense_features(model, ids)
    for i in range(1, model.config.n_layers):
        if settled(i, feats[i - 1], clf(i, feats[i - 1]).softmax(-1)):
            return i
    return model.config.n_layers


@pytest.mark.parametrize("gate", ["confidence", "patience", "router"])
def test_a_gate_stops_where_the_dense_features_say(tiny, gate):
    model = tiny[0]
    clf = random_classifier(model, router=True)
    for seed in range(4):
        ids = document(model, seed=seed)
        with torch.no_grad():
            probs = [clf(i, f).softmax(-1) for i, f in enumerate(dense_features(model, ids), 1)]
        tau = sorted(float(p.max()) for p in probs)[len(probs) // 2]  # settles somewhere in the middle
        make = {"confidence": lambda: MaxProb(tau), "patience": lambda: Patience(2),
                "router": lambda: RouterGate(clf.router, 0.5)}[gate]
        ref = make()
        ref.reset()
        want = first_settled(model, clf, ids, ref.settled)
        p, d = classify(model, clf, ids, DocumentExit(clf, make()), Stats())
        assert d == want
        torch.testing.assert_close(p, probs[d - 1], **TOL)


def test_token_level_exits_inside_a_document_equal_the_dense_pattern(tiny):
    """Tokens before the last W leave at k by a prompt policy; the document stops at the gate."""
    model, L = tiny[0], tiny[0].config.n_layers
    clf, ids, k = random_classifier(model), document(model), 2
    tokens = PromptPolicy(Static(k, L), FullDepth(), len(ids) - 4)
    p, d = classify(model, clf, ids, DocumentExit(clf, MaxProb(1.0), tokens), Stats())  # 1.0: never settled
    assert d == L
    exit_at = [k] * (len(ids) - 4) + [L] * 4
    torch.testing.assert_close(p, clf(L, dense_features(model, ids, exit_at)[-1]).softmax(-1), **TOL)


def test_classifier_file_round_trips_and_is_refused_for_other_weights(tiny, tmp_path):
    model = tiny[0]
    clf = random_classifier(model, router=True)
    path = tmp_path / "c.safetensors"
    from checkpoint import POOLING, model_id
    save_classifier(clf, path, {"base_model": model_id(model), "pooling": POOLING, "policy": "confidence:0.99"})
    back = load_classifier(path, model)
    assert back.labels == LABELS and back.meta["policy"] == "confidence:0.99"
    for k, t in clf.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k
    assert not list(tmp_path.glob("*.tmp"))
    save_classifier(clf, path, {"base_model": "other:0123456789ab", "pooling": POOLING})
    with pytest.raises(UserError, match="was made for other:0123456789ab, not for this model"):
        load_classifier(path, model)


def test_damaged_classifier_files_are_refused(tiny, tmp_path):
    from safetensors.torch import save_file
    from checkpoint import POOLING, model_id
    model = tiny[0]
    path = tmp_path / "c.safetensors"
    clf = random_classifier(model)
    tensors = {k: t.detach().contiguous() for k, t in clf.state_dict().items()}
    meta = {"base_model": model_id(model), "pooling": POOLING, "labels": '["a", "b", "c"]'}
    save_file(tensors | {"w": tensors["w"][:, :-1].contiguous()}, str(path), metadata=meta)
    with pytest.raises(UserError, match="is damaged: tensor w is"):
        load_classifier(path, model)
    save_file(tensors, str(path), metadata=meta | {"labels": "not json"})
    with pytest.raises(UserError, match="malformed metadata"):
        load_classifier(path, model)
    path.write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable classifier file"):
        load_classifier(path, model)


def write_folder(root, texts):
    for label, files in texts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / label / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def test_a_labelled_folder_is_read_sorted_with_repeats_kept_once(tmp_path):
    root = write_folder(tmp_path, {"b": {"1.txt": "one", "2.txt": "two", "3.txt": " one\n"},
                                   "a": {"1.txt": "caf\xe9".encode("latin-1")}})
    labels, docs, notes = read_labelled(root)
    assert labels == ["a", "b"]
    assert docs == [("a/1.txt", "caf\xe9", 0), ("b/1.txt", "one", 1), ("b/2.txt", "two", 1)]
    assert notes == "1 repeated texts kept once; 1 files not UTF-8, read as Latin-1"


@pytest.mark.parametrize("texts, message", [
    ({}, "has 0 label folder"),
    ({"a": {"1.txt": "x"}}, "has 1 label folder"),
    ({"a": {"1.txt": "x"}, "b": {}}, "holds no .txt files"),
    ({"a": {"1.txt": "x"}, "b": {"1.txt": "  \n"}}, "is empty; remove it"),
    ({"a": {"1.txt": "same text"}, "b": {"9.txt": "same  text"}}, "hold the same text under two labels"),
])
def test_bad_labelled_folders_are_refused_in_one_line(tmp_path, texts, message):
    root = write_folder(tmp_path / "data", texts) if texts else (tmp_path / "data")
    root.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=message) as e:
        read_labelled(root)
    assert "\n" not in str(e.value)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        read_labelled(tmp_path / "nowhere")


def small_corpus(root):
    words = {"business": "market shares profit bank trade", "sport": "match goal team win coach",
             "tech": "software chip phone internet data"}
    return write_folder(root, {label: {f"{j}.txt": f"{w} " * (3 + j) + f"story {j}." for j in range(6)}
                               for label, w in words.items()})


def test_train_exits_classify_writes_classifiers_that_sample_reads(tiny, tmp_path, monkeypatch, capsys):
    import sample
    import train_exits
    monkeypatch.chdir(tmp_path)
    d, corpus, out = tiny[4], small_corpus(tmp_path / "corpus"), tmp_path / "c.safetensors"
    argv = ["--checkpoint", str(d), "--classify", str(corpus), "--out", str(out), "--held-out", "6",
            "--tokens", "16", "--epochs", "1"]
    train_exits.main(argv)
    clf = load_classifier(out, tiny[0])
    assert clf.labels == ["business", "sport", "tech"] and clf.router is not None
    assert clf.meta["held_out"] == "6" and clf.meta["tokens"] == "16" and clf.meta["policy"].startswith("confidence:")
    with pytest.raises(UserError, match="exists; pass --force"):
        train_exits.main(argv)  # nothing a user made is overwritten
    capsys.readouterr()
    sample.main(["--checkpoint", str(d), "--prompt", "goal team win", "--classify", str(out), "--compare"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" ")[0] in clf.labels and "read at layer" in lines[0]
    assert lines[1].startswith("full depth: ") and "speed ratio" in lines[1]


@pytest.mark.parametrize("extra, message", [
    (["--eval"], "--classify and --eval are separate runs"),
    (["--held-out", "18"], "has 18 documents; --held-out 18 leaves none to train on"),
])
def test_train_exits_classify_refuses_bad_settings(tiny, tmp_path, monkeypatch, extra, message):
    import train_exits
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", str(tiny[4]), "--classify", str(small_corpus(tmp_path / "corpus")),
            "--out", str(tmp_path / "c.safetensors")]
    with pytest.raises(UserError, match=message):
        train_exits.main(argv + extra)


@pytest.mark.parametrize("extra, message", [
    (["--policy", "entropy"], "--policy entropy does not classify"),
    (["--policy", "static", "--threshold", "0.5"], "--threshold does nothing with --policy static"),
    (["--exit-layer", "3"], "--exit-layer does nothing with --policy confidence"),
])
def test_sample_classify_refuses_bad_settings(tiny, tmp_path, extra, message):
    import sample
    from checkpoint import POOLING, model_id
    path = tmp_path / "c.safetensors"
    save_classifier(random_classifier(tiny[0]), path, {"base_model": model_id(tiny[0]), "pooling": POOLING})
    with pytest.raises(UserError, match=message):
        sample.main(["--checkpoint", str(tiny[4]), "--prompt", "x", "--classify", str(path)] + extra)


def test_bench_classify_exits_records_accuracy_agreement_and_speed(tiny):
    from bench import exit_classify_policies, exit_classify_records, run_exit_classify
    model = tiny[0]
    clf = random_classifier(model, router=True)
    docs = [(document(model, seed=s), s % 3) for s in range(4)]
    pols = exit_classify_policies(clf, model.config.n_layers, quick=True)
    acc = run_exit_classify(model, clf, docs, pols)
    records = {(r["policy"], r["setting"]): r for r in exit_classify_records(acc, len(docs), "tiny")}
    full = records[("full", None)]
    assert full["agreement"] == 1 and full["mean_decision_layer"] == model.config.n_layers
    assert records[("document-static", 6)]["mean_decision_layer"] == 6
    for r in records.values():
        assert r["n"] == r["timed"] == 4 and 0 <= r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"] <= 1
        assert r["full_accuracy"] == full["accuracy"] and r["speedup"] > 0
