"""Measure prefill and decode speed of each exit policy beside full depth, and the KV fill.

Policies are measured alternately within the same run (full, A, full, B, ... per repeat)
so that machine noise hits them alike; the table reports medians over repeats.
    python bench.py                      # default model, float32
    python bench.py --json bench.json
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch

from adept import DEFAULT_EXITS, FullDepth, generate, make_policy
from kv_cache import fill_decoupled, fill_sequential
from model import UserError, default_checkpoint, load
from sample import DTYPES

TEXT = ("The history of the lighthouse is a story of engineering, commerce and human courage. Long before "
        "electric lamps, keepers tended open fires and later oil lamps with polished reflectors, climbing "
        "hundreds of steps each night to keep the light burning through storms. ")


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_fill(model, exit_layer, repeats):
    """Seconds to fill the skipped layers' K/V of one token exiting at exit_layer: decoupled vs sequential."""
    cache = model.new_cache(1, 8)
    h = torch.randn(1, model.config.dim, dtype=model.tok_emb.dtype, device=model.tok_emb.device)
    pos, e = torch.tensor([5], device=h.device), torch.tensor([exit_layer], device=h.device)
    out = {}
    with torch.no_grad():
        for name, fill in (("decoupled", fill_decoupled), ("sequential", fill_sequential)):
            for _ in range(5):
                fill(cache, model, h, pos, e)  # warm-up
            out[name] = median_time(lambda: fill(cache, model, h, pos, e), repeats)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--policies", nargs="+", default=None,
                   help="POLICY or POLICY:SETTING, e.g. static:24 confidence:0.9 (default: full static:24 confidence:0.9 entropy:0.5 [router])")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fill-exit-layer", type=int, default=10)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    model, tok = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype])
    L = model.config.n_layers
    ids = tok.encode(TEXT * (args.prompt_tokens // 40 + 1))[:args.prompt_tokens]
    specs = args.policies or ["static:24", "confidence:0.9", "entropy:0.5"] + (["router"] if DEFAULT_EXITS.is_file() and not args.checkpoint else [])
    policies = {"full": FullDepth()}
    for spec in specs:
        name, _, setting = spec.partition(":")
        if name == "full":
            continue
        value = float(setting) if setting else None
        policies[spec] = make_policy(name, model, threshold=None if name == "static" else value,
                                     exit_layer=int(value) if name == "static" and value else None)
    runs = {k: [] for k in policies}
    generate(model, ids[:16], 4, FullDepth())  # warm-up
    for r in range(args.repeats):
        for key, policy in policies.items():
            g = generate(model, ids, args.new_tokens, policy)
            runs[key].append(g)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    med = lambda xs: statistics.median(xs)
    records = []
    for key, gs in runs.items():
        g = gs[-1]
        rec = {"policy": key.split(":")[0], "setting": key.partition(":")[2] or None,
               "prefill_tokens_per_s": med(len(ids) / x.prefill_s for x in gs),
               "decode_tokens_per_s": med((len(x.tokens) - 1) / x.decode_s for x in gs),
               "prefill_mean_exit_layer": g.prefill.mean_exit_layer, "decode_mean_exit_layer": g.decode.mean_exit_layer,
               "prefill_compute_saved": g.prefill.saved, "decode_compute_saved": g.decode.saved,
               "agreement_with_full": sum(a == b for a, b in zip(g.tokens, runs["full"][-1].tokens)) / len(g.tokens)}
        records.append(rec)
    full = records[0]
    for rec in records:
        rec["prefill_speedup"] = rec["prefill_tokens_per_s"] / full["prefill_tokens_per_s"]
        rec["decode_speedup"] = rec["decode_tokens_per_s"] / full["decode_tokens_per_s"]
    fill = bench_fill(model, args.fill_exit_layer, 200)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\n{model.name}, {args.dtype} on {args.device} ({machine}); prompt {len(ids)} tokens, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats} alternating repeats\n")
    print("| policy | prefill tok/s | x full | decode tok/s | x full | mean exit layer (prefill / decode) | compute saved, counters (prefill / decode) | tokens = full |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        name = r["policy"] + (f" {r['setting']}" if r["setting"] else "")
        print(f"| {name} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_speedup']:.2f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['decode_speedup']:.2f} | {r['prefill_mean_exit_layer']:.1f} / {r['decode_mean_exit_layer']:.1f} of {L} | "
              f"{r['prefill_compute_saved']:.0%} / {r['decode_compute_saved']:.0%} | {r['agreement_with_full']:.0%} |")
    print(f"\nKV fill of one token exiting at layer {args.fill_exit_layer} of {L}: decoupled {fill['decoupled'] * 1e6:.0f} us, "
          f"sequential {fill['sequential'] * 1e6:.0f} us, {fill['sequential'] / fill['decoupled']:.1f}x faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model.name, "dtype": args.dtype, "device": args.device, "machine": machine,
                       "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "policies": records, "kv_fill": {"exit_layer": args.fill_exit_layer, **fill,
                                                        "speedup": fill["sequential"] / fill["decoupled"]}}, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
