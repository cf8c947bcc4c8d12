"""One-off measurement (issue 17): one call of the decoupled fill on the default model, this tree's (one exit layer per
call, one sliced write) against the one before it (per-token exit layers, a mask, an index scatter; from faa4cff),
best of 5 rounds of 200 calls, for a few (tokens, exit layer) events as prefill meets them.

    python docs/fill_cost.py
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root))
import kv_cache as new
from adept import load_fill
from checkpoint import load
from convert import default_checkpoint

before = Path(tempfile.mkdtemp()) / "kv_cache_before.py"
before.write_text(subprocess.run(["git", "-C", str(root), "show", "faa4cff:kv_cache.py"], capture_output=True, text=True, check=True).stdout)
spec = importlib.util.spec_from_file_location("old_kv", before)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
model, tok = load(default_checkpoint())
load_fill(model)


def best(f, n=200):
    for _ in range(20):
        f()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


with torch.no_grad():
    for n, e in ((1, 26), (5, 26), (20, 22), (1, 12)):
        cache = model.new_cache(1, 256)
        h, pos = torch.randn(n, model.config.dim) * 3, torch.arange(100, 100 + n)
        t_old = best(lambda: old.fill_decoupled(cache, model, h, pos, torch.full((n,), e)))
        t_new = best(lambda: new.fill_decoupled(cache, model, h, pos, e))
        print(f"{n} token(s) leaving at {e}: before {t_old * 1e6:.0f} us, now {t_new * 1e6:.0f} us")
