"""Generate text with ADEPT early exit: python sample.py --prompt "..."

Each generated token is shown with the depth at which it exited (coloured on a
terminal, `text[depth]` otherwise), then a summary of layers used and speed.
"""
import argparse
import sys
import time

import torch

from adept import DEFAULT_EXITS, DEFAULT_FILL, POLICIES, FullDepth, check_sampling, generate, load_fill, make_policy
from checkpoint import DTYPES, load
from convert import default_checkpoint
from model import UserError
from tune_exits import load_tuning

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="the text to continue (or the user message, with --chat)")
    p.add_argument("--checkpoint", help="a Hugging Face-layout LLaMA directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (with --temperature > 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, help="use the model's chat template (default: if it has one)")
    p.add_argument("--policy", choices=POLICIES, help="exit policy (default: router if one exists for the model, else full)")
    p.add_argument("--tuning", help="merge this exit-tuning delta (train_exits.py --tune) into the model; use a router trained for it")
    p.add_argument("--exits", help=f"router file from train_exits.py (default: {DEFAULT_EXITS.relative_to(DEFAULT_EXITS.parent.parent)})")
    p.add_argument("--threshold", type=float, default=None, help="exit threshold of router/confidence/entropy (default: the policy's own)")
    p.add_argument("--min-layer", type=int, default=None, help="no token exits before this layer (default: 1, or the router file's)")
    p.add_argument("--exit-layer", type=int, default=None, help="the layer of the static policy (default 24)")
    p.add_argument("--prompt-exit-layer", type=int, help="prompt tokens before the last exit at this layer (default: by --policy)")
    p.add_argument("--prompt-exits", help="a router for prompt tokens (train_exits.py --target prompt) instead")
    p.add_argument("--fill", help=f"fill calibration from train_exits.py --calibrate, or 'plain' (default: {DEFAULT_FILL.name})")
    p.add_argument("--compare", action="store_true", help="also run the full model and compare speed and tokens")
    p.add_argument("--no-color", action="store_true", help="plain text with [depth] after each token")
    return p.parse_args(argv)


def printer(tok, n_layers, show_depth, use_colour):
    """on_token for generate: streams the decoded text, holding back incomplete UTF-8 sequences, each piece
    marked with its token's exit depth (a background from green, shallow, to red, full depth; or text[depth])."""
    ids, printed = [], 0

    def on_token(token, depth):
        nonlocal printed
        if token in tok.eos_ids:
            return
        ids.append(token)
        text = tok.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        piece, printed = text[printed:], len(text)
        if show_depth and use_colour:
            x = (depth - 1) / max(n_layers - 1, 1)
            piece = f"\033[48;5;{16 + 36 * round(5 * x) + 6 * round(5 * (1 - x))}m\033[38;5;16m{piece}\033[0m"
        elif show_depth:
            piece = f"{piece}[{depth}]"
        print(piece, end="", flush=True)
    return on_token


def main(argv=None):
    args = parse_args(argv)
    if args.prompt.strip() == "":
        raise UserError("the prompt is empty; give some text with --prompt")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        raise UserError("the prompt is not valid UTF-8 text; check your terminal's encoding") from None
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError("--top-k and --top-p do nothing with greedy decoding; add --temperature > 0 or drop them")
    if args.compare and args.max_new_tokens < 2:
        raise UserError("--compare measures decode speed, which needs --max-new-tokens >= 2")
    if not 0 <= args.seed < 2 ** 64:
        raise UserError(f"--seed must be in [0, 2**64), got {args.seed}")
    check_sampling(args.temperature, args.top_k, 1.0 if args.top_p is None else args.top_p, args.max_new_tokens)
    torch.manual_seed(args.seed)
    ckpt = args.checkpoint or default_checkpoint()
    t0 = time.perf_counter()
    model, tok = load(ckpt, args.device, DTYPES[args.dtype])
    if args.tuning:
        load_tuning(model, args.tuning)
    L = model.config.n_layers
    default_router = args.exits or (args.checkpoint is None and args.tuning is None and DEFAULT_EXITS.is_file())
    policy_name = args.policy or ("router" if default_router else "full")
    policy = make_policy(policy_name, model, args.threshold, args.min_layer, args.exit_layer, args.exits)
    if args.prompt_exit_layer is not None and args.prompt_exits:
        raise UserError("--prompt-exit-layer and --prompt-exits are two prompt policies; choose one")
    prompt_policy = (make_policy("static", model, exit_layer=args.prompt_exit_layer) if args.prompt_exit_layer is not None else
                     make_policy("router", model, exits=args.prompt_exits) if args.prompt_exits else None)
    load_fill(model, args.fill)
    ids = tok.prompt(args.prompt, args.chat)
    print(f"[{model.name}: {L} layers, {args.dtype} on {args.device}, loaded in {time.perf_counter() - t0:.1f}s; "
          f"policy {policy_name}; {len(ids)} prompt tokens]", file=sys.stderr)
    show_depth = policy_name != "full"
    on_token = printer(tok, L, show_depth, sys.stdout.isatty() and not args.no_color)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=1.0 if args.top_p is None else args.top_p,
              seed=args.seed, eos_ids=tok.eos_ids, prompt_policy=prompt_policy)
    g = generate(model, ids, args.max_new_tokens, policy, on_token=on_token, **kw)
    print()
    tps = lambda g: max(len(g.tokens) - 1, 0) / g.decode_s if g.decode_s > 0 else float("nan")  # the first token is prefill's
    line = f"{len(g.tokens)} tokens, {tps(g):.1f} tokens/s decode, prefill {len(ids)} tokens in {g.prefill_s:.2f}s"
    if show_depth:
        line += (f"; mean layers/token: prefill {g.prefill.mean_exit_layer:.1f}, decode {g.decode.mean_exit_layer:.1f} of {L}; "
                 f"compute saved (est.): prefill {g.prefill.saved:.0%}, decode {g.decode.saved:.0%}")
    print(line, file=sys.stderr)
    if args.compare:
        f = generate(model, ids, args.max_new_tokens, FullDepth(), **kw | {"prompt_policy": None})
        same = sum(a == b for a, b in zip(g.tokens, f.tokens))
        prefix = next((j for j, (a, b) in enumerate(zip(g.tokens, f.tokens)) if a != b), min(len(g.tokens), len(f.tokens)))
        print(f"full: {tps(f):.1f} tokens/s decode; speed ratio {tps(g) / tps(f):.2f}x (ideal from the counters "
              f"{g.decode.ideal_speedup:.2f}x); {same}/{len(f.tokens)} tokens agree position by position, first {prefix} identical",
              file=sys.stderr)
        print(f"full model's text: {tok.decode(f.tokens)!r}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
