"""Exit tuning (the joint optimisation of Shan et al., "Early Exit Is a Natural Capability in
Transformer-based Models", arXiv 2412.01455): low-rank deltas on every layer's projections,
self-distilled from the frozen base model at full depth, with the ADEPT path in the loop:
tokens exit at sampled layers, later tokens are trained through their filled K/V, and the
exited tokens' own loss is taken through the shared head at their exit layer.

    python tune_exits.py                  # writes exits/<model>.tuning.safetensors
    python train_exits.py --tuning FILE --out R.safetensors   # then a router for the tuned model
    python sample.py --tuning FILE ...    # the delta merged into the weights at load

The router (train_exits.py) learns where a frozen model may exit; exit tuning changes the
model instead, and a router is then trained for the tuned model.
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from checkpoint import DEFAULT_EXITS, UserError, load, load_fill, model_id, run, save_tuning
from convert import default_checkpoint
from data import (NOT_IMPORTED, STDLIB, TUNE_PROMPTS, chunks, docstrings, generated_text, resume,
                  save_atomic)
from train_exits import check_ranges, prepare

# ----------------------------------------------------------------------------- low-rank deltas

TUNABLE = ("wqkv", "wo", "w13", "w2")  # the stacked projections a delta may change


class LowRank(torch.nn.Module):
    """A low-rank delta of one stacked weight W [L, in, out], every layer at once: W + (alpha/r) · A @ B.
    B starts at zero: the base model bit for bit. A parametrization of W (add_deltas), it is seen by
    every reader of W, the layer and the decoupled KV fill alike."""
    def __init__(self, n_layers, d_in, d_out, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(n_layers, d_in, rank) / d_in ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(n_layers, rank, d_out))
        self.scale, self.on = alpha / rank, True

    def forward(self, W):
        return W + self.scale * (self.A @ self.B) if self.on else W


def add_deltas(model, rank, alpha, targets=TUNABLE):
    """Put a trainable LowRank delta on each target weight of `model`; returns {name: delta}."""
    deltas = {}
    for name in targets:
        W = getattr(model, name)
        deltas[name] = LowRank(W.shape[0], W.shape[1], W.shape[2], rank, alpha).to(W.device, W.dtype)
        parametrize.register_parametrization(model, name, deltas[name], unsafe=True)
    return deltas


def merge_deltas(model):
    """Write the deltas into the stacked weights and drop them: inference then runs the plain code."""
    with torch.no_grad():
        for name in list(getattr(model, "parametrizations", {})):
            parametrize.remove_parametrizations(model, name, leave_parametrized=True)
            getattr(model, name).requires_grad_(False)


# ----------------------------------------------------------------------------- exit tuning


def tuning_data(model, tok, args):
    """Windows [N, --seq-len] of token ids to tune on, and held-out ones: text the model generates
    from TUNE_PROMPTS and the docstrings of the standard library outside STDLIB (the router's text),
    or --data; split by whole document, then each side made one stream and cut into windows."""
    docs = [ids for k in range(args.gen_seeds)
            for ids, _ in generated_text(model, tok, args.seed + 1 + k, args.gen_tokens, prompts=TUNE_PROMPTS)]
    modules = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in {*STDLIB, *NOT_IMPORTED})
    docs += [tok.encode(d) for d in (args.data_texts or docstrings(modules))]
    random.Random(args.seed).shuffle(docs)
    n_val, sep = max(1, len(docs) // 20), min(tok.eos_ids or {0})
    stream = lambda ds: [t for d in ds for t in d + [sep]]
    windows = lambda ids: torch.tensor(chunks(ids, args.tune_len)[:len(ids) // args.tune_len]).view(-1, args.tune_len)
    return windows(stream(docs[n_val:])), windows(stream(docs[:n_val]))


def switch(deltas, on):
    for d in deltas.values():
        d.on = on


def tuning_loss(model, deltas, ids, exit_layer, final_weight, fill=True):
    """Per token KL(base at full depth ‖ tuned model), the tuned model's logits taken through the ADEPT path:
    at its exit layer for a token that exits (weight 1), at the last layer for the others (weight final_weight).
    fill=False is the ablation without the ADEPT path: exits judged on full-depth states, no filled K/V."""
    with torch.no_grad():
        switch(deltas, False)
        teacher = model(ids).float().log_softmax(-1)  # [B, T, vocab]
        switch(deltas, True)
    with parametrize.cached():  # W + A·B once per step, not at every read of W
        if fill:
            logits = model(ids, exit_layer)
        else:
            hs = []
            model(ids, hidden_states=hs)
            h = torch.stack([h for h, *_ in hs])                                  # [L, B, T, D]
            logits = model.head(h.gather(0, (exit_layer - 1)[None, ..., None].expand(1, *h.shape[1:]))[0])
    kl = (teacher.exp() * (teacher - logits.float().log_softmax(-1))).sum(-1)  # [B, T]
    w = torch.where(exit_layer == model.config.n_layers, final_weight, 1.0)
    return (w * kl).sum() / w.sum(), kl


@torch.no_grad()
def tuning_estimate(model, deltas, val, exit_layers):
    """Held-out agreement with the base model's full-depth argmax on the first 8 windows of `val`
    (1,024 tokens at the default --seq-len): the tuned model at full depth, and its shared head at
    the first, middle and last of the tuned exit layers; with the KL at full depth."""
    L, (lo, hi) = model.config.n_layers, exit_layers
    layers, val = sorted({lo, (lo + L) // 2, hi}), val[:8].to(model.tok_emb.device)
    switch(deltas, False)
    base = model(val).float().log_softmax(-1)
    switch(deltas, True)
    hs = []
    with parametrize.cached():
        tuned = model(val, hidden_states=hs).float().log_softmax(-1)
    target = base.argmax(-1)
    out = {"final": (tuned.argmax(-1) == target).float().mean().item(),
           "final_kl": (base.exp() * (base - tuned)).sum(-1).mean().item()}
    return out | {f"layer {i}": (model.head(hs[i - 1][0]).argmax(-1) == target).float().mean().item() for i in layers}


# What a resumed run must share with the checkpoint it resumes (the data too: --data, --gen-seeds,
# --seq-len), by the flags' attribute names (dest), which resume files and delta metadata keep
RECIPE = ("seed", "rank", "alpha", "tune_lr", "tune_steps", "tune_batch", "exit_layers", "exit_rate", "final_weight", "no_fill",
          "data", "gen_seeds", "tune_len")


def tune(model, train, val, args, ckpt=None, stop_after=None, progress=True):
    """Train low-rank deltas on `model` (added here) by self-distillation through the ADEPT path;
    returns (deltas, log). Resumes from `ckpt` if it exists, equal to an uninterrupted run."""
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    deltas = add_deltas(model, args.rank, args.alpha)
    params = [p for d in deltas.values() for p in (d.A, d.B)]
    opt = torch.optim.Adam(params, lr=args.tune_lr)
    step, log = 0, []
    recipe = {k: getattr(args, k, None) for k in RECIPE}
    if state := resume(ckpt, recipe):
        for name, d in deltas.items():
            d.load_state_dict(state["deltas"][name])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
    L, dev, (lo, hi) = model.config.n_layers, model.tok_emb.device, args.exit_layers
    if not log:
        log.append({"step": 0, "tokens": 0, **tuning_estimate(model, deltas, val, args.exit_layers)})
    bar = tqdm(total=args.tune_steps, initial=step, desc="exit tuning", disable=not progress)
    while step < args.tune_steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # drawn per step: a resumed run draws the same
        ids = train[torch.randint(len(train), (args.tune_batch,), generator=g)]
        exit_layer = torch.randint(lo, hi + 1, ids.shape, generator=g)  # uniform on lo..hi
        exits = torch.rand(ids.shape, generator=g) < args.exit_rate  # the rest run all L layers
        exit_layer = torch.where(exits, exit_layer, L).to(dev)
        ids = ids.to(dev)
        for group in opt.param_groups:  # linear warm-up, then cosine decay to a tenth
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = args.tune_lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / args.tune_steps))
        loss, kl = tuning_loss(model, deltas, ids, exit_layer, args.final_weight, fill=not args.no_fill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        full = exit_layer == L
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", final_kl=f"{kl[full].mean().item():.3f}",
                        exit_kl=f"{kl[~full].mean().item():.3f}")
        if step % args.eval_every == 0 or step == args.tune_steps:
            log.append({"step": step, "tokens": step * ids.numel(), **tuning_estimate(model, deltas, val, args.exit_layers)})
            bar.write("  held-out agreement with base: " + ", ".join(
                f"{k} {v:.3f}" for k, v in log[-1].items() if k not in ("step", "tokens")) + f" ({log[-1]['tokens']} tokens)")
        if ckpt and (step % args.eval_every == 0 or step == args.tune_steps or step == stop_after):
            save_atomic({"deltas": {n: d.state_dict() for n, d in deltas.items()}, "opt": opt.state_dict(),
                         "step": step, "log": log, "recipe": recipe}, ckpt)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    return deltas, log


def main(argv=None):
    """Data, the tuning loop (resumable), the delta file, and what bfloat16 storage costs."""
    args = parse_args(argv)
    out = check_args(args)
    runs = prepare(args, out, "--out")
    model, tok = load(args.checkpoint or default_checkpoint(), args.device)
    load_fill(model, "plain")  # exit tuning trains with the plain fill, as the shipped delta was
    L, t0, base_id = model.config.n_layers, time.time(), model_id(model)
    args.exit_layers = args.exit_layers or [max(1, L - 8), L - 1]
    if not 1 <= args.exit_layers[0] <= args.exit_layers[1] <= L:
        raise UserError(f"--exit-range {args.exit_layers[0]} {args.exit_layers[1]} must satisfy "
                        f"1 <= LO <= HI <= {L}")
    train_w, val_w = tuning_data(model, tok, args)
    if len(train_w) == 0 or len(val_w) == 0:
        raise UserError(f"too little text to tune on: {len(train_w)} training and {len(val_w)} held-out windows of "
                        f"{args.tune_len} tokens; give more with --data or a shorter --seq-len")
    print(f"tuning data: {train_w.numel()} training tokens, {val_w.numel()} held-out ({time.time() - t0:.0f}s)", file=sys.stderr)
    ckpt = runs / f"{out.stem}.resume.pt"
    deltas, log = tune(model, train_w, val_w, args, ckpt=ckpt)
    meta = {"base_model": base_id, "rank": args.rank, "alpha": args.alpha, "targets": ",".join(deltas),
            "final_weight": args.final_weight, "exit_rate": args.exit_rate, "exit_layers": "%d-%d" % tuple(args.exit_layers),
            "fill_in_loop": not args.no_fill, "data": "--data" if args.data else f"generated x{args.gen_seeds} + stdlib docstrings",
            "tokens_trained": args.tune_steps * args.tune_batch * args.tune_len, "lr": args.tune_lr, "seed": args.seed}
    save_tuning(deltas, out, meta)
    ckpt.unlink(missing_ok=True)
    # what bfloat16 storage costs: the last held-out estimate again, with the deltas rounded as stored
    with torch.no_grad():
        for p in (p for d in deltas.values() for p in (d.A, d.B)):
            p.copy_(p.to(torch.bfloat16))
    stored = tuning_estimate(model, deltas, val_w, args.exit_layers)
    print("stored in bfloat16: " + ", ".join(f"{k} {log[-1][k]:.4f} -> {v:.4f}" for k, v in stored.items()), file=sys.stderr)
    print(f"wrote {out} after {time.time() - t0:.0f}s")
    if args.json:
        command = "python tune_exits.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.json).write_text(json.dumps({"meta": {**meta, "command": command},
                                               "learning_curve": log, "stored_bf16": stored}, indent=2))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="base model directory (default: SmolLM2-135M-Instruct)")
    # a flag's second spelling is an alias; dest is the name resume files and metadata keep
    p.add_argument("--out", "--tuning-out", dest="tuning_out", metavar="FILE", help="delta file to "
                   "write (default: exits/<model>.tuning.safetensors for the default model)")
    p.add_argument("--data", nargs="+", help="your own text files to tune on (default: generated text and stdlib "
                   "docstrings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8, help="rank of every delta")
    p.add_argument("--alpha", type=float, default=16.0, help="deltas are scaled by alpha / rank")
    p.add_argument("--steps", "--tune-steps", dest="tune_steps", metavar="N", type=int, default=200,
                   help="optimizer steps (about 6.6 s each on 2 CPU cores)")
    p.add_argument("--lr", "--tune-lr", dest="tune_lr", metavar="LR", type=float, default=3e-4)
    p.add_argument("--batch", "--tune-batch", dest="tune_batch", metavar="N", type=int, default=4,
                   help="sequences per step")
    p.add_argument("--seq-len", "--tune-len", dest="tune_len", metavar="N", type=int, default=128,
                   help="tokens per sequence")
    p.add_argument("--exit-rate", type=float, default=0.25, help="share of tokens that exit in the ADEPT path")
    p.add_argument("--exit-range", "--exit-layers", dest="exit_layers", metavar=("LO", "HI"),
                   type=int, nargs=2, help="tokens exit at a layer drawn from LO..HI (default: the "
                   "deepest 8 exits, L-8 .. L-1, where the router exits on the default model; "
                   "shallower exits' large losses pulled the deep layers away)")
    p.add_argument("--final-weight", type=float, default=16.0, help="weight of the full-depth tokens' loss "
                   "(exits: 1)")
    p.add_argument("--no-fill-in-loop", "--no-fill", dest="no_fill", action="store_true",
                   help="ablation: exits judged on full-depth states, no filled K/V in the loop")
    p.add_argument("--gen-seeds", type=int, default=2, help="generated samples of each tuning prompt")
    p.add_argument("--gen-tokens", type=int, default=224, help="length of each generated tuning text")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out estimates and checkpoints")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", help="exit tuning trains in float32 only")
    p.add_argument("--json", help="write the learning curve here")
    p.add_argument("--force", action="store_true", help="overwrite an existing delta file")
    # accepted, so that a train_exits.py --tune line runs here as it is
    p.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args):
    """Everything the user gave, checked before the minutes of work start; returns the file to write."""
    check_ranges([
        ("--seed", args.seed, "in [0, 2**32)"), ("--rank", args.rank, ">= 1"),
        ("--alpha", args.alpha, "> 0"), ("--steps", args.tune_steps, ">= 1"),
        ("--lr", args.tune_lr, "> 0"), ("--batch", args.tune_batch, ">= 1"),
        ("--seq-len", args.tune_len, ">= 2"), ("--exit-rate", args.exit_rate, "in [0, 1]"),
        ("--gen-seeds", args.gen_seeds, ">= 1"), ("--final-weight", args.final_weight, "> 0"),
        ("--eval-every", args.eval_every, ">= 1")])
    if args.dtype != "float32":
        raise UserError("exit tuning trains in float32 (Adam on bfloat16 deltas loses the small updates); "
                        "drop --dtype")
    if args.checkpoint and not args.tuning_out:
        raise UserError("with --checkpoint, name the delta file to write with --out")
    return Path(args.tuning_out or DEFAULT_EXITS.with_suffix(".tuning.safetensors"))


if __name__ == "__main__":
    run(main)
