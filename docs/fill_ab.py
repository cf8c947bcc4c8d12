"""One-off measurement (issue 17): the router's 256-token prefill with this tree's fill (one exit layer per call,
one sliced write) against the fill before it (per-token exit layers, a mask and an index scatter; taken from
faa4cff), alternating per document, each after full depth on the same document; the logits must be identical.

    python docs/fill_ab.py [N_DOCS]
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
import adept
from adept import FullDepth, Stats, forward_tokens, load_fill, make_policy
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint
before = Path(tempfile.mkdtemp()) / "kv_cache_before.py"
before.write_text(subprocess.run(["git", "-C", str(root), "show", "faa4cff:kv_cache.py"], capture_output=True, text=True, check=True).stdout)
spec = importlib.util.spec_from_file_location("old_kv", before); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
new_fill = adept.KV_FILLS["decoupled"]
old_fill = lambda cache, model, h, pos, e: old.fill_decoupled(cache, model, h, pos, torch.full((len(pos),), e))
model, tok = load(default_checkpoint()); load_fill(model)
pol = make_policy("router", model)
docs, _ = human_documents(tok, 256, int(sys.argv[1]) if len(sys.argv) > 1 else 48)
t = {"full": 0.0, "new": 0.0, "old": 0.0}
def run(ids, policy, fill):
    adept.KV_FILLS["decoupled"] = fill
    s = Stats(); t0 = time.perf_counter()
    logits, _ = forward_tokens(model, ids, 0, model.new_cache(1, len(ids)), policy, s)
    return time.perf_counter() - t0, logits, s
with torch.no_grad():
    for j, d in enumerate(docs):
        ids = torch.tensor(d)
        order = ["new", "old"] if j % 2 == 0 else ["old", "new"]
        dt, ref, _ = run(ids, FullDepth(), new_fill); t["full"] += dt
        out = {}
        for which in order:
            dt, out[which], s = run(ids, pol, new_fill if which == "new" else old_fill); t[which] += dt
        assert torch.equal(out["new"], out["old"]), "the two fills must give the same logits"
n = len(docs)
print(f"{n} documents: full {t['full']/n*1e3:.1f} ms; router, fill with one exit layer per call {t['new']/n*1e3:.1f} ms "
      f"({t['full']/t['new']:.3f}x); router, per-token fill as before {t['old']/n*1e3:.1f} ms ({t['full']/t['old']:.3f}x); same logits")
