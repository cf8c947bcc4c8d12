"""Classification with exit classifiers: a head per layer on a document's pooled features.

- The features a document's head reads through `forward_tokens` equal those of the dense
  pass under the same exit pattern (calibrated fill included).
- A document that stops at layer e computes exactly layers 1..e: no layer above, no fill above;
  tokens that leave earlier get only the K/V of the layers that still run.
- The gates decide where the dense features say they would.
- Classifier files round-trip exactly and are refused for another model or when damaged.
- Labelled folders: one line for each bad input.
"""
import json

import pytest
import torch

import adept
import kv_cache
from adept import (DocumentExit, ExitClassifier, FullDepth, MaxProb, Patience, Policy, PromptPolicy, Router,
                   RouterGate, Static, Stats, classify, forward_tokens, pooled)
from checkpoint import load_classifier, read_labelled, save_classifier
from checkpoint import UserError
from train_exits import choose_policy, decision_layers

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
        if gate != "router":  # the layer train_exits.py predicts when it chooses a policy
            spec = f"confidence:{tau}" if gate == "confidence" else "patience:2"
            assert int(decision_layers(torch.stack(probs)[:, None], spec)[0]) == d


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
    assert clf.meta["held_out"] == "6" and clf.meta["tokens"] == "16"
    table = json.loads(clf.meta["out_of_fold"])  # every candidate, the shipped policy among them
    assert clf.meta["policy"] in [row["policy"] for row in table] and table[-1]["policy"] == "full"
    printed = capsys.readouterr().err
    assert f"{clf.meta['policy']} " in printed and "<- shipped" in printed
    with pytest.raises(UserError, match="exists; pass --force"):
        train_exits.main(argv)  # nothing a user made is overwritten
    capsys.readouterr()
    sample.main(["--checkpoint", str(d), "--prompt", "goal team win", "--classify", str(out), "--compare"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" ")[0] in clf.labels and "read at layer" in lines[0]
    assert lines[1].startswith("full depth: ") and "speed ratio" in lines[1]


@pytest.mark.parametrize("extra, message", [
    (["--eval"], "--classify and --eval are separate runs"),
    (["--held-out", "18"], "holding out 18 of 18 documents leaves none to train on"),
    (["--held-out", "17"],
     "label [a-z]+ has 6 document.s., too few to train on after holding out 17"),
    (["--held-out", "1.5"],
     "--held-out must be a fraction in .0, 1. or a whole number of documents"),
    (["--budget", "-1"], "--budget must be in .0, 100."),
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
    clf.meta = {"policy": "patience:3"}
    docs = [(document(model, seed=s), s % 3) for s in range(4)]
    pols = exit_classify_policies(model, clf, quick=True)
    acc = run_exit_classify(model, clf, docs, pols)
    records = {(r["policy"], r["setting"]): r
               for r in exit_classify_records(acc, docs, "tiny", "patience:3")}
    full = records[("full", None)]
    assert full["agreement"] == 1 and full["mean_decision_layer"] == model.config.n_layers
    assert records[("document-static", 3)]["mean_decision_layer"] == 3
    assert [key for key, r in records.items() if r["default"]] == [("patience", 3)]
    for r in records.values():
        assert (r["n"] == len(r["item_ms"]) == 4
                and 0 <= r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"] <= 1)
        assert r["full_accuracy"] == full["accuracy"] and r["throughput_speedup"] > 0


def synthetic_probs(layers):
    """Out-of-fold probabilities [L, N, 3] from rows of (label, its probability) per layer."""
    probs = torch.zeros(len(layers[0]), len(layers), 3)
    for n, doc in enumerate(layers):
        for i, (label, p) in enumerate(doc):
            probs[i, n] = (1 - p) / 2
            probs[i, n, label] = p
    return probs


def test_the_cheapest_policy_within_budget_is_chosen():
    """7 documents are easy (label 0, sure at every layer); 3 read label 1 at layers 1-2, then 0."""
    easy, hard = [(0, 0.96)] * 6, [(1, 0.7)] * 2 + [(0, 0.96)] * 4
    probs, y = synthetic_probs([easy] * 7 + [hard] * 3), torch.zeros(10, dtype=torch.long)
    policy, table = choose_policy(probs, y, budget=0.005)
    rows = {spec: (acc, layer) for spec, acc, layer, _ in table}
    assert (rows["full"] == (1.0, 6) and rows["static:1"] == (0.7, 1)
            and rows["static:3"] == (1.0, 3))
    assert rows["confidence:0.7"][0] == 0.7  # 0.7 is sure enough for the wrong label
    assert rows["confidence:0.8"] == (1.0, pytest.approx(1.6))  # easy ones at 1, hard ones at 3
    assert rows["patience:2"] == (0.7, 2) and rows["patience:3"] == (1.0, pytest.approx(3.6))
    assert rows["confidence:0.98"] == (1.0, 6)  # never sure: read at the last layer
    assert policy == "confidence:0.8"  # the first of the cheapest within budget
    policy, _ = choose_policy(probs, y, budget=0.3)
    assert rows[policy] == (0.7, 1)  # 30 points of budget: the cheapest of all


def test_full_depth_is_chosen_when_no_cheaper_policy_keeps_the_accuracy():
    """Every layer but the last is sure of the wrong label."""
    wrong = [(1, 0.99999)] * 5 + [(0, 0.6)]
    policy, table = choose_policy(synthetic_probs([wrong] * 4), torch.zeros(4, dtype=torch.long),
                                  0.005)
    assert policy == "full"
    assert all(acc == 0 and not within for spec, acc, _, within in table if spec != "full")


def labelled(sizes):
    return [(f"{label}/{j}.txt", f"text {label} {j}", y)
            for y, (label, n) in enumerate(sizes.items()) for j in range(n)]


def test_a_fractional_split_holds_out_a_share_of_every_label():
    from data import split
    docs = labelled({"a": 10, "b": 5, "c": 2})
    train, held = split(docs, 0.2, seed=0)
    count = lambda part, y: sum(label == y for *_, label in part)
    assert [count(held, y) for y in range(3)] == [2, 1, 1]  # a fifth, at least one each
    assert sorted(train + held) == sorted(docs)
    assert split(docs, 0.2, seed=0) == (train, held) and split(docs, 0.2, seed=1) != (train, held)
    train, held = split(docs, 4, seed=0)  # a count: the first of the seeded shuffle
    assert len(held) == 4 and sorted(train + held) == sorted(docs)


def test_a_label_too_small_to_train_and_hold_out_is_one_line():
    from data import split
    with pytest.raises(UserError, match="label c has 1 document.s., too few to train on") as e:
        split(labelled({"a": 10, "c": 1}), 0.2, seed=0)
    assert "\n" not in str(e.value)


@pytest.fixture
def trained(tiny, tmp_path, monkeypatch):
    """Exit classifiers trained by train_exits.py on a small folder with its defaults:
    (file, folder)."""
    import train_exits
    monkeypatch.chdir(tmp_path)
    corpus, out = small_corpus(tmp_path / "corpus"), tmp_path / "c.safetensors"
    train_exits.main(["--checkpoint", str(tiny[4]), "--classify", str(corpus), "--out", str(out),
                      "--tokens", "16", "--epochs", "1"])
    return out, corpus


def test_bench_measures_classifiers_on_their_own_folder(tiny, trained, tmp_path):
    import bench
    out, corpus = trained
    clf = load_classifier(out, tiny[0])
    assert (clf.meta["held_out"] == "0.2"
            and clf.meta["held_out_documents"] == "3")  # 1 of 6 per label
    bench.main(["--checkpoint", str(tiny[4]), "--classifier", str(out), "--labelled", str(corpus),
                "--json", str(tmp_path / "b.json"), "--plots", str(tmp_path)])
    records = json.loads((tmp_path / "b.json").read_text())["records"]
    full = next(r for r in records if r["policy"] == "full")
    assert [r for r in records if r.get("default")] == \
        [r for r in records if f"{r['policy']}:{r['setting']}".replace("document-", "") ==
         clf.meta["policy"] or (r["policy"] == "full" and clf.meta["policy"] == "full")]
    for r in records:
        assert r["n"] == 3 and len(r["item_ms"]) == len(r["item_layers"]) == 3
        assert r["throughput_speedup"] == pytest.approx(sum(full["item_ms"]) / sum(r["item_ms"]),
                                                        rel=1e-3)
        assert r["speedup_lo"] <= r["throughput_speedup"] <= r["speedup_hi"]
        assert r["mean_decision_layer"] == sum(r["item_layers"]) / 3
    assert (tmp_path / "exit_classify.png").stat().st_size > 0


def test_bench_refuses_a_folder_the_classifiers_were_not_trained_on(tiny, trained, tmp_path):
    import bench
    out, _ = trained
    other = write_folder(tmp_path / "other", {"business": {"1.txt": "a b"},
                                              "sport": {"1.txt": "c d"},
                                              "tech": {"1.txt": "e f"}})
    with pytest.raises(UserError, match="was not trained on .*other's split"):
        bench.main(["--checkpoint", str(tiny[4]), "--classifier", str(out),
                    "--labelled", str(other)])


def test_sample_labels_a_folder_of_documents(tiny, trained, tmp_path, capsys):
    import sample
    out, corpus = trained
    capsys.readouterr()
    sample.main(["--checkpoint", str(tiny[4]), "--classify", str(out), "--documents", str(corpus),
                 str(corpus / "tech" / "0.txt"), "--policy", "patience:2", "--compare",
                 "--json", str(tmp_path / "labels.json")])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 19 and lines[0].startswith(f"{corpus / 'business' / '0.txt'}  ")
    assert "layer" in lines[0]
    assert lines[-1].startswith(str(corpus / "tech" / "0.txt"))
    assert "19 documents in" in captured.err and "throughput" in captured.err
    written = json.loads((tmp_path / "labels.json").read_text())
    assert written["documents"] == 19 and written["policy"] == "patience:2"
    assert all(2 <= r["layer"] <= tiny[0].config.n_layers for r in written["rows"])
    assert written["total_s"] == pytest.approx(sum(r["ms"] for r in written["rows"]) / 1000,
                                               abs=1e-3)


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "holds no .txt files"),
    (lambda d: None, "does not exist"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text(" \n")), "is empty; remove it"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("x")),
     "cannot read .*a.txt .Permission denied"),
])
def test_bad_documents_are_refused_in_one_line(tiny, trained, tmp_path, monkeypatch, make, message):
    import pathlib

    import sample
    make(tmp_path / "docs")
    read = pathlib.Path.read_bytes
    def unreadable(path):  # a permission error even for root, who may read anything
        if path.name == "a.txt" and path.read_text() == "x":
            raise PermissionError(13, "Permission denied")
        return read(path)
    monkeypatch.setattr(pathlib.Path, "read_bytes", unreadable)
    with pytest.raises(UserError, match=message) as e:
        sample.main(["--checkpoint", str(tiny[4]), "--classify", str(trained[0]),
                     "--documents", str(tmp_path / "docs")])
    assert "\n" not in str(e.value)


def test_agreement_by_layer_reaches_one_at_the_last_layer(tiny, trained, tmp_path):
    import bench
    model, tok = tiny[0], tiny[1]
    out, corpus = trained
    clf = load_classifier(out, model)
    records = bench.labels_by_layer(model, tok, clf, bench.held_out_documents(clf, out, corpus),
                                    "small")
    assert [r["readout"] for r in records] == ["mean over tokens", "last token"]
    for r in records:
        assert r["n"] == 3 and len(r["agreement_by_layer"]) == model.config.n_layers
        assert r["agreement_by_layer"][-1] == 1 and all(0 <= a <= 1 for a in r["accuracy_by_layer"])
    bench.main(["--quick", "--checkpoint", str(tiny[4]), "--by-layer-only",
                "--json", str(tmp_path / "l.json"), "--plots", str(tmp_path)])
    records = json.loads((tmp_path / "l.json").read_text())["records"]
    assert [r["text"] for r in records] == ["human text, next token", "generated text, next token"]
    assert all(r["agreement_by_layer"][-1] == 1 and r["n"] == 8 * 64 for r in records)
    assert (tmp_path / "agreement_by_layer.png").stat().st_size > 0


@pytest.mark.parametrize("calibrated", [False, True])
def test_token_level_features_are_the_pools_of_the_dense_pattern(tiny, calibrated):
    """Features for a token-level policy's heads, read on the inference path, equal the dense
    pass under its exit pattern: the tokens before the last at 2, the last at L; layer 0 is the
    token embeddings, layers 1..L the full-depth pass; both readouts (mean, last token)."""
    from train_exits import both_readouts, token_level_read
    model, L = tiny[0], tiny[0].config.n_layers
    model.fill_mu = torch.randn(L + 1, model.config.dim) * 0.1 if calibrated else None
    try:
        ids = document(model, 12)
        got = token_level_read(model, [Static(2, L)])(ids.tolist())  # [1 + L + 1, 2, D]
        assert got.shape == (L + 2, 2, model.config.dim)
        pattern = [2] * 11 + [L]
        for row, exit_at in ((L, None), (L + 1, pattern)):
            hs = []
            with torch.no_grad():
                model(ids[None], exit_layer=exit_at and torch.tensor([exit_at]), hidden_states=hs)
            torch.testing.assert_close(got[row], both_readouts(model, hs[-1][0][0]), **TOL)
        torch.testing.assert_close(got[0], both_readouts(model, model.tok_emb[ids]), **TOL)
    finally:
        model.fill_mu = None


def test_bench_token_level_classify_pairs_policies_of_equal_speed(tiny, trained, tmp_path):
    """Every policy in both readouts with throughput from its per-document times, the bag of
    words among them; each token-level policy paired with a document-level depth."""
    import bench
    out, corpus = trained
    bench.main(["--checkpoint", str(tiny[4]), "--classifier", str(out), "--labelled", str(corpus),
                "--token-level-classify-only", "--json", str(tmp_path / "t.json")])
    records = json.loads((tmp_path / "t.json").read_text())["records"]
    for readout in bench.READOUTS:
        rs = {(r["policy"], r["setting"]): r for r in records if r.get("readout") == readout
              and r["scenario"] == "classify-token-level"}
        assert {"full", "embedding", "document-static", "token-static"} == {p for p, _ in rs}
        full = rs[("full", None)]
        for r in rs.values():  # item times are rounded to the microsecond: the bag of words
            assert r["n"] == 3 and len(r["item_ms"]) == len(r["item_labels"]) == 3  # takes a few
            ratio = sum(full["item_ms"]) / sum(r["item_ms"])
            assert r["throughput_speedup"] == pytest.approx(ratio, rel=0.05)
        pairs = [r for r in records if r["scenario"] == "token-vs-document"
                 and r["readout"] == readout]
        assert sorted(p["token_level"].split(":") for p in pairs) == \
            sorted([p, str(s)] for p, s in rs if p == "token-static")
        assert all(("document-static", p["document_level"]) in rs for p in pairs)


def test_a_classification_reads_the_layers_to_its_decision_and_its_heads(tiny):
    """A document stopped by the confidence gate at d reads d layers' weights, no fill (nobody
    runs past d), no LM head, the classifier's head at each layer asked (1..d), and the cache of
    its n tokens at each of its d layers."""
    model, L = tiny[0], tiny[0].config.n_layers
    c, ids, clf, stats = model.config, document(model, 12), random_classifier(model), Stats()
    _, d = classify(model, clf, ids, DocumentExit(clf, MaxProb(0.0)), stats)
    assert d == 1
    layer = c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim
    assert stats.weight_bytes == 4 * (layer + c.dim * len(LABELS))
    assert stats.kv_bytes == 12 * 2 * c.kv_dim * 4


def test_bench_in_bfloat16_measures_itself_against_float32(tiny, trained, tmp_path):
    """--dtype bfloat16 adds records of full depth against the float32 weights: next tokens,
    decode, and the exit classifiers' labels (loaded and run in bfloat16)."""
    import bench
    out, corpus = trained
    bench.main(["--quick", "--checkpoint", str(tiny[4]), "--dtype", "bfloat16", "--classifier",
                str(out), "--labelled", str(corpus), "--json", str(tmp_path / "b.json")])
    records = [r for r in json.loads((tmp_path / "b.json").read_text())["records"]
               if r["scenario"] == "against float32"]
    assert [r["text"].split(",")[0] for r in records] == ["human text", "chat prompts"] + \
        ["corpus"] * (1 + (load_classifier(out, tiny[0]).meta["policy"] != "full"))
    for r in records:
        assert r["reference"] == "float32" and 0 <= r["agreement"] <= 1 and r["n"] > 0
    assert records[0]["n"] == 4 * 64 and records[0]["agreement"] > 0.5
    assert records[0]["throughput_speedup"] == pytest.approx(
        sum(records[0]["full_item_ms"]) / sum(records[0]["item_ms"]))
