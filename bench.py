"""End-to-end measurements of ADEPT against full depth, on the same machine in the same run.

Scenarios (every figure beside `full`, measured alternately, median over repeats):
  decode       greedy generation from a fixed, varied prompt set: tokens/s, mean exit layer,
               share of tokens identical to the full model's output, and the full model's
               perplexity of each output
  prefill-N    an N-token prompt of human text: prefill tokens/s, and agreement of the next
               tokens (decoded at full depth) with the full model's, so that only the
               prompt tokens' exits matter
  kv-*         the router with the skipped layers' KV filled sequentially or left empty
               (masked out), against ADEPT's decoupled fill
  kv_fill      the fill itself for one token exiting at layer 10: decoupled vs sequential

    python bench.py                   # full run, default model (under 20 min on 2 CPU cores)
    python bench.py --quick           # under 3 minutes
    python bench.py --json bench.json --plots docs/
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adept import DEFAULT_EXITS, FullDepth, Policy, generate, make_policy
from kv_cache import fill_decoupled, fill_sequential
from model import UserError, default_checkpoint, load
from sample import DTYPES

PROMPTS = ["What is the capital of France?", "Explain how a bicycle works.", "Write a short poem about winter.",
           "Give three tips for learning a new language.", "Why do leaves change colour in autumn?",
           "Describe a typical day of a baker."]
PARAGRAPH = "Explain in a short paragraph why the sky is blue."


class PrefillOnly(Policy):
    """Applies a policy to the prompt's tokens only; generated tokens run at full depth."""
    def __init__(self, policy, n_prompt):
        self.policy, self.n_prompt, self.min_layer = policy, n_prompt, policy.min_layer

    def decide(self, model, i, pos, h, q, k, v, stats):
        return None if int(pos[0]) >= self.n_prompt else self.policy.decide(model, i, pos, h, q, k, v, stats)


@torch.no_grad()
def full_ppl(model, prompt, outputs):
    """The full model's perplexity of generated tokens, given their prompt."""
    nll, n = 0.0, 0
    for p, out in zip(prompt, outputs):
        if not out:
            continue
        ids = torch.tensor([p + out])
        logits = model(ids)[0, len(p) - 1:-1]
        nll += float(F.cross_entropy(logits.float(), ids[0, len(p):], reduction="sum"))
        n += len(out)
    return math.exp(nll / max(n, 1))


def human_text(tok, n_tokens):
    from train_exits import docstrings
    ids = []
    for d in docstrings():
        ids += tok.encode(d + "\n\n")
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise UserError(f"not enough text for a {n_tokens}-token prompt")


def run_decode(model, prompts, n_new, policy, kv_fill="decoupled"):
    gs = [generate(model, p, n_new, policy, kv_fill=kv_fill) for p in prompts]
    n_tok = sum(len(g.tokens) - 1 for g in gs)
    return {"tokens_per_s": n_tok / sum(g.decode_s for g in gs), "tokens": [g.tokens for g in gs],
            "mean_exit_layer": sum(g.decode.layers for g in gs) / max(sum(g.decode.tokens for g in gs), 1),
            "compute_saved": 1 - sum(g.decode.total_macs for g in gs) / sum(g.decode.full_macs for g in gs)}


def run_prefill(model, prompt, n_next, policy):
    g = generate(model, prompt, n_next, PrefillOnly(policy, len(prompt)))
    return {"tokens_per_s": len(prompt) / g.prefill_s, "tokens": [g.tokens], "mean_exit_layer": g.prefill.mean_exit_layer,
            "compute_saved": g.prefill.saved}


def agreement(tokens, full_tokens):
    pairs = [(a, b) for t, f in zip(tokens, full_tokens) for a, b in zip(t, f)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def bench_fill(model, exit_layer, repeats):
    """Seconds to fill the skipped layers' K/V of one token exiting at exit_layer: decoupled vs sequential."""
    cache = model.new_cache(1, 8)
    h = torch.randn(1, model.config.dim, dtype=model.tok_emb.dtype, device=model.tok_emb.device)
    pos, e = torch.tensor([5], device=h.device), torch.tensor([exit_layer], device=h.device)
    out = {}
    with torch.no_grad():
        for name, fill in (("decoupled", fill_decoupled), ("sequential", fill_sequential)):
            times = []
            for r in range(repeats + 5):  # 5 warm-up calls
                t0 = time.perf_counter()
                fill(cache, model, h, pos, e)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times[5:])
    return out


def settings(quick, has_router, n_layers):
    """(policy, setting) pairs; baselines span the router's range of mean depth so they can be compared at equal cost."""
    # The gates evaluate the LM head at every layer, which makes them slow to measure; one setting each, at the
    # router's depth (about 28.5 of 30 on held-out text in train_exits.py), keeps the full run under 20 minutes.
    s = [("static", max(1, min(n_layers - 1, round(f * n_layers)))) for f in (0.87, 0.93)]  # layers 26, 28 of 30
    s += [("confidence", 0.9999), ("entropy", 0.001)]
    if has_router:
        s += [("router", t) for t in ((None,) if quick else (0.4, None))]
    return list(dict.fromkeys(s))


def plots(records, model, tok, router_policy, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in dict.fromkeys(r["scenario"] for r in records) if not s.startswith("kv")]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.2), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        rows = [r for r in records if r["scenario"] == sc]
        for pol in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["speedup"], r["agreement"]) for r in rows if r["policy"] == pol)
            ax.plot(*zip(*pts), "k*" if pol == "full" else "o-", label=pol, markersize=5)
        ax.set(title=sc, xlabel="speed-up over full depth (measured)", ylabel="tokens identical to full model", ylim=(0, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "speed_quality.png", dpi=110)
    plt.close(fig)
    # one paragraph, each token shaded by the layer it exited at
    ids = tok.encode(tok.chat(PARAGRAPH))
    g = generate(model, ids, min(80, model.config.max_seq_len - len(ids)), router_policy, eos_ids=tok.eos_ids)
    L = model.config.n_layers
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axis("off")
    x, y, cmap = 0.0, 1.0, plt.get_cmap("RdYlGn_r")
    for t, e in zip(g.tokens, g.exit_layers):
        piece = tok.decode([t])
        if t in tok.eos_ids:
            break
        if "\n" in piece or x > 0.93:
            x, y = 0.0, y - 0.09
        piece = piece.replace("\n", " ")
        ax.text(x, y, piece, fontsize=11, family="monospace", va="top",
                      bbox=dict(boxstyle="square,pad=0.1", fc=cmap((e - 1) / (L - 1)), ec="none"))
        x += 0.0123 * max(len(piece), 1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, L))
    fig.colorbar(sm, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02, label="exit layer")
    ax.set_title(f"Exit layer of each generated token (router): \"{PARAGRAPH}\"", fontsize=10)
    fig.savefig(out_dir / "exit_depths.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--exits", help="router file (default: the shipped one, for the default model)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="a small run (under 3 minutes on 2 cores)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3, quick 1)")
    p.add_argument("--json", help="write one record per (policy, setting, scenario) here")
    p.add_argument("--plots", help="write speed_quality.png and exit_depths.png into this folder")
    args = p.parse_args(argv)

    model, tok = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype])
    L = model.config.n_layers
    exits = args.exits or (DEFAULT_EXITS if not args.checkpoint and DEFAULT_EXITS.is_file() else None)
    repeats = args.repeats or (1 if args.quick else 3)
    n_prompts, n_new = (2, 16) if args.quick else (len(PROMPTS), 40)
    prompts = [tok.encode(tok.chat(q) if tok.has_chat else q) for q in PROMPTS[:n_prompts]]
    context = model.config.max_seq_len
    prefill_lens = [n for n in ((128,) if args.quick else (512, 2048)) if n + 16 <= context] or [context // 2]
    long_prompts = {n: human_text(tok, n) for n in prefill_lens}
    policies = {(name, s): make_policy(name, model, threshold=None if name == "static" else s,
                                       exit_layer=s if name == "static" else None, exits=exits)
                for name, s in settings(args.quick, exits is not None, L)}
    generate(model, prompts[0], 4, FullDepth())  # warm-up

    runs = {}  # (scenario, policy, setting) -> list of results over repeats
    add = lambda key, r: runs.setdefault(key, []).append(r)
    t0 = time.time()
    for rep in range(repeats):
        for (name, s), pol in [(("full", None), FullDepth())] + list(policies.items()):
            add(("decode", name, s), run_decode(model, prompts, n_new, pol))
            for n, lp in long_prompts.items():
                add((f"prefill-{n}", name, s), run_prefill(model, lp, 16, pol))
        if exits:
            router = make_policy("router", model, exits=exits)
            for fill in ("sequential", "none"):
                add((f"kv-{fill}", "router", None), run_decode(model, prompts, n_new, router, kv_fill=fill))
        print(f"repeat {rep + 1}/{repeats} done ({time.time() - t0:.0f}s)", file=sys.stderr)

    records = []
    for (scenario, name, s), rs in runs.items():
        base = "decode" if scenario.startswith("kv-") else scenario
        full = runs[(base, "full", None)]
        tps, full_tps = statistics.median(r["tokens_per_s"] for r in rs), statistics.median(r["tokens_per_s"] for r in full)
        src = prompts if base == "decode" else [long_prompts[int(base.split("-")[1])]]
        setting = s if s is not None else (float(policies[(name, s)].threshold) if name == "router" else None)
        records.append({"policy": name, "setting": setting, "scenario": scenario,
                        "kv_fill": scenario[3:] if scenario.startswith("kv-") else "decoupled",
                        "mean_exit_layer": rs[-1]["mean_exit_layer"], "compute_saved": rs[-1]["compute_saved"],
                        "tokens_per_s": tps, "full_tokens_per_s": full_tps, "speedup": tps / full_tps,
                        "agreement": agreement(rs[-1]["tokens"], full[-1]["tokens"]),
                        "ppl": full_ppl(model, src, rs[-1]["tokens"]), "full_ppl": full_ppl(model, src, full[-1]["tokens"])})
    fill = bench_fill(model, min(10, L - 1), 50 if args.quick else 200)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\n{model.name}, {args.dtype} on {args.device} ({machine}); greedy; {n_prompts} prompts x {n_new} new tokens; "
          f"median of {repeats} alternating repeats; `python bench.py{' --quick' if args.quick else ''}`\n")
    print("| scenario | policy | setting | mean exit layer | compute saved | tokens/s | full tokens/s | speed-up | tokens = full | ppl (full model) | full's ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['scenario']} | {r['policy']} | {r['setting'] if r['setting'] is not None else ''} | {r['mean_exit_layer']:.1f} | "
              f"{r['compute_saved']:.0%} | {r['tokens_per_s']:.1f} | {r['full_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['agreement']:.0%} | {r['ppl']:.2f} | {r['full_ppl']:.2f} |")
    print(f"\nKV fill of one token exiting at layer {min(10, L - 1)} of {L}: decoupled {fill['decoupled'] * 1e6:.0f} us, "
          f"sequential {fill['sequential'] * 1e6:.0f} us: {fill['sequential'] / fill['decoupled']:.1f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.name, "dtype": args.dtype, "device": args.device, "machine": machine,
                                               "quick": args.quick, "repeats": repeats, "records": records,
                                               "kv_fill": {**fill, "speedup": fill["sequential"] / fill["decoupled"]}}, indent=2))
    if args.plots:
        plots(records, model, tok, make_policy("router", model, exits=exits) if exits else make_policy("static", model), Path(args.plots))
    print(f"total {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
