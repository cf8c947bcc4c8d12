"""One-off: generation and prefill under torch.no_grad against torch.inference_mode, alternating in one process.

python docs/grad_mode.py ROUNDS   (decode: the 6 bench chat prompts, 40 new tokens, full depth and the shipped router;
prefill: 24 human 256-token documents at full depth). Prints medians of per-pair ratios no_grad time / inference time.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import FullDepth, Stats, forward_tokens, generate, load_fill, make_policy  # noqa: E402
from bench import PROMPTS, human_documents  # noqa: E402
from checkpoint import load  # noqa: E402
from convert import default_checkpoint  # noqa: E402

model, tok = load(default_checkpoint())
load_fill(model)
rounds = int(sys.argv[1])
modes = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
plain_generate = generate.__wrapped__  # generate without its own decorator: the mode comes from the caller
for name, policy in [("full", FullDepth()), ("router", make_policy("router", model))]:
    ratios = []
    for r in range(rounds):
        for q in PROMPTS:
            s = {}
            for m in (modes if r % 2 else reversed(modes)):
                with modes[m]():
                    g = plain_generate(model, tok.prompt(q), 40, policy, eos_ids=tok.eos_ids)
                s[m] = g.decode_s / max(len(g.tokens) - 1, 1)
            ratios.append(s["no_grad"] / s["inference_mode"])
    print(f"decode {name}: inference_mode speed / no_grad speed, median of {len(ratios)} pairs {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios)[0]:.3f}, {statistics.quantiles(ratios)[2]:.3f})")
docs, _ = human_documents(tok, 256, 24)
ratios = []
for r in range(rounds):
    for d in docs:
        s = {}
        for m in (modes if r % 2 else reversed(modes)):
            with modes[m]():
                t0 = time.perf_counter()
                forward_tokens(model, torch.tensor(d), 0, model.new_cache(1, 256), FullDepth(), Stats())
                s[m] = time.perf_counter() - t0
        ratios.append(s["no_grad"] / s["inference_mode"])
print(f"prefill 256 full: inference_mode speed / no_grad speed, median of {len(ratios)} pairs {statistics.median(ratios):.3f} "
      f"(quartiles {statistics.quantiles(ratios)[0]:.3f}, {statistics.quantiles(ratios)[2]:.3f})")
