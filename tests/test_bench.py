"""bench.py end to end on a tiny model: it runs and writes well-formed records."""
import json
import subprocess
import sys
from pathlib import Path

from adept import Router, model_id

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_wellformed_json(tiny, tmp_path):
    model, *_, ckpt = tiny
    c = model.config
    router = Router(c.n_layers, 2 * c.dim + 2 * c.kv_dim)
    router.save(tmp_path / "r.safetensors", {"base_model": model_id(model), "n_layers": c.n_layers, "dim": c.dim,
                                              "threshold": 0.5, "min_layer": 2, "lam": 4.0, "beta": 1.0})
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "bench.py"), "--quick", "--checkpoint", str(ckpt), "--exits",
                        str(tmp_path / "r.safetensors"), "--json", str(out), "--plots", str(tmp_path / "plots")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    records = data["records"]
    keys = {"policy", "setting", "scenario", "mean_exit_layer", "tokens_per_s", "full_tokens_per_s", "speedup",
            "agreement", "ppl", "full_ppl"}
    assert all(keys <= set(rec) for rec in records)
    scenarios = {rec["scenario"] for rec in records}
    assert {"decode", "kv-sequential", "kv-none"} <= scenarios and any(s.startswith("prefill-") for s in scenarios)
    assert {rec["policy"] for rec in records} == {"full", "static", "confidence", "entropy", "router"}
    for rec in records:
        assert 1 <= rec["mean_exit_layer"] <= c.n_layers and 0 <= rec["agreement"] <= 1
        assert rec["tokens_per_s"] > 0 and rec["ppl"] > 1 and rec["full_ppl"] > 1
        if rec["policy"] == "full":
            assert rec["agreement"] == 1 and rec["mean_exit_layer"] == c.n_layers
    assert data["kv_fill"]["decoupled"] > 0 and data["kv_fill"]["sequential"] > 0
    assert (tmp_path / "plots" / "speed_quality.png").stat().st_size > 0
    assert (tmp_path / "plots" / "exit_depths.png").stat().st_size > 0
