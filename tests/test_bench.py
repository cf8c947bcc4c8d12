"""bench.py: the record schema, the interval, and the prefill scenario against full depth."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adept import FullDepth, PromptPolicy, Router, Static, Stats
from checkpoint import UserError, model_id, save_router
import bench
from bench import LABELS, labelled_documents, prefill_last, run_prefill
from evaluate import wilson

REPO = Path(__file__).resolve().parent.parent
# What bench.py's wrapper prints as one "error:" line (UserError; a ValueError the mechanism raises for an argument it
# refuses by name). Checked in-process; the wrapper itself by test_bench_cli_reports_bad_input_in_one_line.
CLI_ERRORS = (UserError, ValueError)
SCHEMA = {"policy", "setting", "scenario", "model", "reference", "n", "mean_exit_layer", "compute_saved", "agreement",
          "agreement_lo", "agreement_hi"}


@pytest.mark.parametrize("k,n,lo,hi", [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),
                                       (90, 100, 0.8256, 0.9448)])
def test_wilson_interval_on_known_counts(k, n, lo, hi):
    """95% Wilson score intervals, values from the closed form (e.g. 0/10: [0, z²/(n+z²)] = [0, 0.2775])."""
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert got[0] <= k / n <= got[1]


def test_prefill_under_full_policy_equals_plain_forward(tiny):
    """The prefill scenario's last-position prediction at full depth is the plain model's (float tolerance: the head
    runs on one row here and on all rows in model(), which round differently), with the same argmax."""
    model, *_ = tiny
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    logp, _ = prefill_last(model, ids, FullDepth(), Stats())
    with torch.no_grad():
        plain = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
    torch.testing.assert_close(logp, plain, atol=1e-5, rtol=1e-5)
    assert int(logp.argmax()) == int(plain.argmax())
    out = run_prefill(model, [ids, ids[:30] + ids[:10]], {("base", "static", 2): (model, Static(2, model.config.n_layers))})
    n, n_agree, stats, m = out[("base", "full", None)]
    assert (n, n_agree, m["kl"], m["speedup"]) == (2, 2, 0.0, 1.0) and stats.mean_exit_layer == model.config.n_layers
    n, n_agree, stats, m = out[("base", "static", 2)]
    assert n == 2 and stats.mean_exit_layer == 2 and m["kl"] > 0


def test_classify_decides_among_the_label_tokens_at_the_read_position(tiny):
    """Agreement, accuracy and margin of the classify scenario, recomputed from plain forwards."""
    model, *_ = tiny
    label_ids = [5, 9, 17]
    g = torch.Generator().manual_seed(1)
    L = model.config.n_layers
    docs = [(torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist(), j % 3, n - 5) for j, n in enumerate((20, 33, 41, 27))]
    with torch.no_grad():
        logp = [model(torch.tensor([ids]))[0, -1, label_ids].float().log_softmax(-1) for ids, _, _ in docs]
    document = PromptPolicy(Static(2, L), FullDepth(), "question")  # the last 5 tokens at full depth
    out = run_prefill(model, docs, {("base", "static", 2): (model, Static(2, L)), ("base", "document-static", 2): (model, document)},
                      label_ids)
    n, n_agree, _, m = out[("base", "full", None)]
    correct = sum(int(lp.argmax()) == label for lp, (_, label, _) in zip(logp, docs))
    assert (n, n_agree) == (4, 4) and m["accuracy"] == m["full_accuracy"] == correct / 4
    assert m["margin"] == pytest.approx(sum(float(lp.topk(2).values[0] - lp.topk(2).values[1]) for lp in logp) / 4, abs=1e-5)
    assert out[("base", "static", 2)][3]["full_accuracy"] == correct / 4
    assert out[("base", "document-static", 2)][2].mean_exit_layer == (2 * (121 - 20) + L * 20) / 121


def test_labelled_documents_are_bbc_articles_with_the_question_in_the_chat_template(smollm):
    _, tok = smollm
    docs, label_ids = labelled_documents(tok, 64, 7)
    assert [label for _, label, _ in docs] == [0, 1, 2, 3, 4, 0, 1]  # the sections in turn
    for ids, _, q in docs:  # the question's first position
        assert tok.decode(ids[q:]).startswith("\n\nWhich section") and "Which section" not in tok.decode(ids[:q])
    assert [tok.decode([i]) for i in label_ids] == ["Business", "Enter", "Pol", "Sports", "Technology"]
    text = tok.decode(docs[0][0])
    assert text.startswith("<|im_start|>system") and text.endswith("Answer with one word.<|im_end|>\n<|im_start|>assistant\n")
    assert all(len(ids) < 64 + 120 for ids, _, _ in docs) and len(LABELS) == 5


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # token labels in exit_depths.png
def test_bench_quick_writes_records_in_the_schema(tiny, tmp_path, monkeypatch):
    model, *_, ckpt = tiny
    c = model.config
    router = Router(c)
    save_router(router, tmp_path / "r.safetensors", {"base_model": model_id(model), "n_layers": c.n_layers, "dim": c.dim,
                                              "threshold": 0.5, "min_layer": 2, "lam": 4.0, "beta": 1.0})
    out = tmp_path / "bench.json"
    monkeypatch.chdir(tmp_path)
    bench.main(["--quick", "--checkpoint", str(ckpt), "--exits", str(tmp_path / "r.safetensors"), "--json", str(out),
                "--plots", str(tmp_path / "plots")])
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "records"}
    records = data["records"]
    assert all(SCHEMA <= set(rec) for rec in records)
    scenarios = {rec["scenario"] for rec in records}
    assert scenarios == {"decode", "decode-tf", "kv-sequential", "kv-none", "prefill-64"}  # 256 > the tiny context
    assert {rec["policy"] for rec in records} == {"full", "static", "confidence", "entropy", "router", "prompt-static"}
    for rec in records:
        assert 1 <= rec["mean_exit_layer"] <= c.n_layers and rec["n"] > 0
        assert rec["agreement_lo"] <= rec["agreement"] <= rec["agreement_hi"]
        assert (rec["model"], rec["reference"]) == ("base", "base")
        if rec["policy"] == "full":
            assert rec["agreement"] == 1 and rec["mean_exit_layer"] == c.n_layers
        if rec["scenario"].startswith("prefill"):
            assert rec["tokens_per_s"] > 0 and rec["speedup"] > 0 and rec["kl"] >= -1e-6  # KL >= 0 up to float rounding
            assert len(rec["item_ms"]) == len(rec["item_agree"]) == rec["n"]
            assert sum(rec["item_agree"]) == round(rec["agreement"] * rec["n"])
            full_ms, ms = sum(rec["full_item_ms"]), sum(rec["item_ms"])
            assert rec["throughput_speedup"] == pytest.approx(full_ms / ms, rel=1e-3)
        if rec["scenario"] == "decode":
            assert rec["throughput_speedup"] > 0
            assert len(rec["item_tokens"]) == len(rec["item_decode_s"])
        if rec["scenario"] == "decode-tf":
            assert rec["ppl"] > 1 and rec["full_ppl"] > 1
    prefill = {(rec["text"], rec["policy"]): rec["n"] for rec in records if rec["scenario"] == "prefill-64"}
    assert prefill[("human", "static")] == 16 and prefill[("generated", "static")] == 4 and ("human", "entropy") not in prefill
    assert (tmp_path / "plots" / "speed_quality.png").stat().st_size > 0
    assert (tmp_path / "plots" / "exit_depths.png").stat().st_size > 0


@pytest.mark.parametrize("args,message", [(["--json", "."], "--json . is a directory"),
                                          (["--plots", "bench.json"], "--plots bench.json is not a directory"),
                                          (["--json", "no/dir/b.json"], "the folder no/dir does not exist"),
                                          (["--prefill-lengths", "0"], "--prefill-lengths must be >= 2"),
                                          (["--tuned-exits", "r.safetensors"], "give the delta with --tuning too")])
def test_bench_bad_output_paths_fail_before_any_work(tiny, tmp_path, monkeypatch, args, message):
    (tmp_path / "bench.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLI_ERRORS, match=re.escape(message)):
        bench.main(["--quick", "--checkpoint", str(tiny[4]), *args])
    assert [f.name for f in tmp_path.iterdir()] == ["bench.json"] and (tmp_path / "bench.json").read_text() == "{}"


def test_bench_runs_one_scenario_alone_at_a_time(capsys):
    """The --*-only flags are one argparse group: a second is refused with the usage, an error
    line naming both, and exit status 2, before anything loads."""
    with pytest.raises(SystemExit) as e:
        bench.main(["--decode-only", "--by-layer-only"])
    assert e.value.code == 2
    assert "--by-layer-only: not allowed with argument --decode-only" in capsys.readouterr().err


def test_bench_cli_reports_bad_input_in_one_line(tiny, tmp_path):
    """The one subprocess test of bench.py: a refusal is one 'error:' line on stderr, no traceback."""
    r = subprocess.run([sys.executable, str(REPO / "bench.py"), "--quick", "--checkpoint", str(tiny[4]),
                        "--prefill-lengths", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--prefill-lengths must be >= 2" in lines[0], r.stderr


def test_paired_test_of_two_policies_by_hand():
    common = {"text": "t", "throughput_speedup": 1.2}
    token = {"item_agree": [1, 1, 1, 0], "agreement": 0.75, "setting": 24} | common
    prompt = {"item_agree": [0, 0, 0, 0], "agreement": 0.0, "setting": 25} | common
    r = bench.paired(token, prompt)
    assert r["difference"] == 0.75
    assert r["mcnemar_p"] == 0.25  # 3 discordant pairs, all one way: 2 / 2**3
    assert r["difference_lo"] < 0.75 < r["difference_hi"]
    assert bench.paired(token, token)["mcnemar_p"] == 1.0


def test_token_vs_prompt_pairs_policies_on_the_same_documents(tiny, tmp_path):
    bench.main(["--quick", "--checkpoint", str(tiny[4]), "--token-vs-prompt-only", "--json",
                str(tmp_path / "t.json")])
    records = json.loads((tmp_path / "t.json").read_text())["records"]
    pairs = [r for r in records if r["scenario"] == "token-vs-prompt"]
    assert len(pairs) == 5 and all(r["n"] == 16 and 0 <= r["mcnemar_p"] <= 1 for r in pairs)
    for r in pairs:
        assert r["difference"] == pytest.approx(r["token_agreement"] - r["prompt_agreement"])
    policies = {r["policy"] for r in records if r["scenario"] == "prefill-64"}
    assert policies == {"full", "static", "prompt-static"}


def test_decode_only_writes_throughput_records_of_decode_alone(tiny, tmp_path):
    bench.main(["--quick", "--checkpoint", str(tiny[4]), "--decode-only",
                "--json", str(tmp_path / "d.json")])
    records = json.loads((tmp_path / "d.json").read_text())["records"]
    assert {r["scenario"] for r in records} == {"decode"}
    for r in records:
        rate = lambda s, n: sum(k - 1 for k in n) / sum(s)  # decoded tokens per second
        policy = rate(r["item_decode_s"], r["item_tokens"])
        assert r["throughput_speedup"] == pytest.approx(policy / rate(r["full_item_decode_s"],
                                                                      r["full_item_tokens"]))


@pytest.mark.parametrize("rates,ideal", [((1.0, 1.0), 200 / 100),      # bytes bound both
                                         ((1.0, 10.0), 40 / 10),       # MACs bound both
                                         ((1.0, 8.0), 40 / 12.5)])     # full: MACs; policy: bytes
def test_roofline_ideal_is_the_larger_bound_of_each(rates, ideal):
    """Time is max(MACs / MAC rate, bytes / byte rate) for full depth and for the policy; the
    achieved rates are the counts over the measured time."""
    r = {"macs": 10, "bytes": 100, "full_macs": 40, "full_bytes": 200, "item_ms": [500, 500]}
    bench.roofline([r], {"macs_per_s": rates[0], "bytes_per_s": rates[1]})
    assert r["roofline_ideal"] == pytest.approx(ideal)
    assert (r["achieved_gbps"], r["achieved_gflops"]) == pytest.approx((100e-9, 20e-9))


@pytest.mark.parametrize("n_bytes,ms,speedup,why", [
    (100, 1000, 2.2, None),  # within 15% of the ideal 2.0: nothing to explain
    (100, 1000, 3.0, "byte-bound at 50% of the machine's byte rate, where full depth is "
                     "byte-bound at 33%: the roofline assumes one fraction"),
    (300, 2000, 0.5, "byte-bound at 75% of the machine's byte rate, where full depth is "
                     "byte-bound at 100%: the roofline assumes one fraction; the bytes it adds "
                     "to full depth's run at 50%")])
def test_roofline_why_names_the_fractions_of_the_limit_reached(n_bytes, ms, speedup, why):
    """Measured over roofline speed-up is the policy's fraction of its limit over full depth's;
    a record off by more than 15% says both, and the fraction its added work reaches."""
    r = {"macs": 1, "bytes": n_bytes, "full_macs": 1, "full_bytes": 200, "item_ms": [ms],
         "throughput_speedup": speedup}
    bench.roofline([r], {"macs_per_s": 1e9, "bytes_per_s": 200})
    assert r.get("roofline_why") == why
