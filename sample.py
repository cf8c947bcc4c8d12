"""Generate text with ADEPT early exit: python sample.py --prompt "..."

Each generated token is shown with the depth at which it exited (coloured on a
terminal, `text[depth]` otherwise), then a summary of layers used and speed.
With --classify FILE the prompt is read as a document and labelled by exit classifiers;
with --documents PATH... as well, every .txt file there is, a line each, then the totals.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from adept import (Confidence, DocumentExit, FullDepth, MaxProb, Patience, RouterGate, RouterPolicy,
                   Static, Stats, check_sampling, classify, generate, sync)
from checkpoint import (DEFAULT_EXITS, DEFAULT_FILL, DTYPES, UserError, load, load_classifier,
                        load_fill, load_router, load_tuning, read_documents, run)
from convert import default_checkpoint
from evaluate import check_output


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", help="text to continue (the user turn, with --chat)")
    p.add_argument("--checkpoint", help="a Hugging Face LLaMA directory (default: SmolLM2-135M)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (temperature > 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="use the model's chat template (default: if it has one)")
    p.add_argument("--policy", help=f"exit policy, NAME or NAME:VALUE: {', '.join(POLICIES)};\n"
                   "e.g. router:0.43, static:24, confidence:0.9 (default: router if there is\n"
                   "one for the model, else full; with --classify, the policy the file ships)")
    p.add_argument("--tuning", help="merge this delta (tune_exits.py); use a router made for it")
    p.add_argument("--exits", help=f"router file (default: exits/{DEFAULT_EXITS.name})")
    p.add_argument("--threshold", type=float, help="router/confidence/entropy threshold")
    p.add_argument("--min-layer", type=int, help="no exit before this layer")
    p.add_argument("--exit-layer", type=int, help="the layer of --policy static (default 24)")
    p.add_argument("--prompt-exit-layer", type=int, help="prompt tokens before the last exit here")
    p.add_argument("--prompt-exits", help="or a prompt router (train_exits.py --target prompt)")
    p.add_argument("--fill", help=f"fill calibration, or 'plain' (default: {DEFAULT_FILL.name})")
    p.add_argument("--compare", action="store_true", help="then full depth: speed and tokens")
    p.add_argument("--classify", metavar="FILE", help="label the prompt with these classifiers")
    p.add_argument("--documents", nargs="+", metavar="PATH", help="with --classify: label these\n"
                   ".txt files, or every .txt file under these folders, a line each")
    p.add_argument("--json", help="with --documents: write the lines and totals here")
    p.add_argument("--no-color", action="store_true", help="text[depth] instead of colours")
    return p.parse_args(argv)


# Each policy of the command line, with the settings it uses. `--policy NAME:VALUE` gives its
# one setting in one word: router:0.43 and confidence:0.9 (a threshold), static:24 (the exit
# layer), patience:3 (layers in a row that give the same label).
POLICIES = {"router": ("threshold", "min_layer", "exits"), "confidence": ("threshold", "min_layer"),
            "entropy": ("threshold", "min_layer"), "static": ("exit_layer",), "full": ()}
# The policies of a whole document (--classify): its gates read the exit classifiers' heads.
DOCUMENT_POLICIES = {"confidence": ("threshold",), "patience": ("patience",),
                     "router": ("threshold",), "static": ("exit_layer",), "full": ()}
VALUE = {"static": ("exit_layer", int), "patience": ("patience", int)}  # else ("threshold", float)


def parse_policy(spec, settings):
    """NAME of `--policy NAME[:VALUE]`, and the settings of the separate flags with VALUE added."""
    name, _, value = (spec or "").partition(":")
    if not value:
        return name, settings
    what, kind = VALUE.get(name, ("threshold", float))
    if settings.get(what) is not None:
        raise UserError(f"--policy {spec} gives the {what.replace('_', ' ')} already; "
                        f"drop --{what.replace('_', '-')}")
    try:
        return name, settings | {what: kind(value)}
    except ValueError:
        kind = "whole number" if kind is int else "number"
        raise UserError(f"--policy {spec}: {value!r} is not a {kind}") from None


def make_policy(name, model, threshold=None, min_layer=None, exit_layer=None, exits=None,
                classifier=None):
    """Build a policy from command-line settings (`name` may be NAME:VALUE); None = the policy's
    default. With exit classifiers, a policy of whole documents. A setting the chosen policy
    does not use is an error, not silently ignored."""
    name, s = parse_policy(name, {"threshold": threshold, "min_layer": min_layer,
                                  "exit_layer": exit_layer, "exits": exits})
    table = POLICIES if classifier is None else DOCUMENT_POLICIES
    if name not in table:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}"
                        if classifier is None else f"--policy {name} does not classify; "
                        f"choose {', '.join(DOCUMENT_POLICIES)}")
    for flag, value in s.items():
        if value is not None and flag not in table[name]:
            why = " (static exits every token at --exit-layer)" if name == "static" else ""
            raise UserError(f"--{flag.replace('_', '-')} does nothing with --policy {name}; "
                            f"drop it{why}")
    L = model.config.n_layers
    if s["min_layer"] is not None and not 1 <= s["min_layer"] <= L:
        raise UserError(f"--min-layer {s['min_layer']} is out of range; it must be in [1, {L}]")
    try:
        if name == "full":
            return FullDepth()
        if name == "static":
            default = min(24, L) if classifier is None else L // 5
            return Static(default if s["exit_layer"] is None else s["exit_layer"], L)
        if classifier is not None:
            return document_gate(name, classifier, s.get("threshold"), s.get("patience"))
        if name == "router":
            return RouterPolicy(load_router(exits or DEFAULT_EXITS, model), s["threshold"],
                                s["min_layer"])
        default = 0.9 if name == "confidence" else 0.5
        return Confidence(default if s["threshold"] is None else s["threshold"],
                          s["min_layer"] or 1, name == "entropy", model.config.vocab_size)
    except ValueError as e:  # a setting out of range, named by the policy
        raise UserError(f"--policy {name}: {e}") from None


def document_gate(name, classifier, threshold, patience):
    """A document stops where a gate on the exit classifiers' heads says its label is settled."""
    if name == "confidence":
        return DocumentExit(classifier, MaxProb(0.9 if threshold is None else threshold))
    if name == "patience":
        return DocumentExit(classifier, Patience(3 if patience is None else patience))
    if classifier.router is None:
        raise UserError("these exit classifiers hold no router; choose another --policy")
    return DocumentExit(classifier, RouterGate(classifier.router,
                                               0.5 if threshold is None else threshold))


def check_args(args):
    """The prompt and the sampling flags, checked before the model loads."""
    if args.documents and not args.classify:
        raise UserError("--documents are labelled by exit classifiers: add --classify FILE")
    if args.json and not args.documents:
        raise UserError("--json writes the lines of --documents; give them, or drop --json")
    if args.json:
        check_output(args.json, "--json")
    args.documents_read = read_documents(args.documents) if args.documents else None
    if args.documents:
        if args.prompt is not None:
            raise UserError("--prompt and --documents: give the text one way")
        return
    if args.prompt is None or args.prompt.strip() == "":
        raise UserError("the prompt is empty; give some text with --prompt")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        raise UserError("the prompt is not valid UTF-8; check your terminal's encoding") from None
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError("--top-k and --top-p do nothing with greedy decoding; "
                        "add --temperature > 0 or drop them")
    if args.compare and args.max_new_tokens < 2:
        raise UserError("--compare measures decode speed, which needs --max-new-tokens >= 2")
    if not 0 <= args.seed < 2 ** 64:
        raise UserError(f"--seed must be in [0, 2**64), got {args.seed}")
    try:  # generate's own check of the sampling settings, its argument names said as flags
        check_sampling(args.temperature, args.top_k, 1.0 if args.top_p is None else args.top_p,
                       args.max_new_tokens)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        raise UserError(f"--{name.replace('_', '-')} {rest}") from None


def printer(tok, n_layers, show_depth, use_colour):
    """on_token for generate: streams the decoded text, holding back incomplete UTF-8 sequences,
    each piece marked with its token's exit depth (a background from green, shallow, to red,
    full depth; or text[depth])."""
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
            colour = 16 + 36 * round(5 * x) + 6 * round(5 * (1 - x))
            piece = f"\033[48;5;{colour}m\033[38;5;16m{piece}\033[0m"
        elif show_depth:
            piece = f"{piece}[{depth}]"
        print(piece, end="", flush=True)
    return on_token


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype])
    if args.classify:
        return classify_main(args, model, tok, t0)
    if args.tuning:
        load_tuning(model, args.tuning)
    L = model.config.n_layers
    shipped = args.checkpoint is None and args.tuning is None and DEFAULT_EXITS.is_file()
    policy_name = args.policy or ("router" if args.exits or shipped else "full")
    policy = make_policy(policy_name, model, args.threshold, args.min_layer, args.exit_layer,
                         args.exits)
    if args.prompt_exit_layer is not None and args.prompt_exits:
        raise UserError("--prompt-exit-layer and --prompt-exits: two prompt policies; choose one")
    prompt_policy = None
    if args.prompt_exit_layer is not None:
        prompt_policy = make_policy("static", model, exit_layer=args.prompt_exit_layer)
    elif args.prompt_exits:
        prompt_policy = make_policy("router", model, exits=args.prompt_exits)
    load_fill(model, args.fill)
    ids = tok.prompt(args.prompt, args.chat)
    print(f"[{model.name}: {L} layers, {args.dtype} on {args.device}, loaded in "
          f"{time.perf_counter() - t0:.1f}s; policy {policy_name}; {len(ids)} prompt tokens]",
          file=sys.stderr)
    show_depth = policy_name != "full"
    on_token = printer(tok, L, show_depth, sys.stdout.isatty() and not args.no_color)
    kw = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed, eos_ids=tok.eos_ids,
              top_p=1.0 if args.top_p is None else args.top_p)
    g = generate(model, ids, args.max_new_tokens, policy, on_token=on_token,
                 prompt_policy=prompt_policy, **kw)
    print()
    line = (f"{len(g.tokens)} tokens, {tokens_per_s(g):.1f} tokens/s decode, prefill {len(ids)} "
            f"tokens in {g.prefill_s:.2f}s")
    if show_depth:
        line += (f"; mean layers/token: prefill {g.prefill.mean_exit_layer:.1f}, decode "
                 f"{g.decode.mean_exit_layer:.1f} of {L}; compute saved (est.): prefill "
                 f"{g.prefill.saved:.0%}, decode {g.decode.saved:.0%}")
    print(line, file=sys.stderr)
    if args.compare:
        compare(g, generate(model, ids, args.max_new_tokens, FullDepth(), **kw), tok)


def tokens_per_s(g):
    """Decode speed; the first token is prefill's."""
    return max(len(g.tokens) - 1, 0) / g.decode_s if g.decode_s > 0 else float("nan")


def compare(g, f, tok):
    """--compare: ADEPT's generation g beside full depth's f."""
    same = sum(a == b for a, b in zip(g.tokens, f.tokens))
    prefix = next((j for j, (a, b) in enumerate(zip(g.tokens, f.tokens)) if a != b),
                  min(len(g.tokens), len(f.tokens)))
    print(f"full: {tokens_per_s(f):.1f} tokens/s decode; speed ratio "
          f"{tokens_per_s(g) / tokens_per_s(f):.2f}x (ideal from the counters "
          f"{g.decode.ideal_speedup:.2f}x); {same}/{len(f.tokens)} tokens agree position by "
          f"position, first {prefix} identical", file=sys.stderr)
    print(f"full model's text: {tok.decode(f.tokens)!r}", file=sys.stderr)


def classify_main(args, model, tok, t0):
    """--classify: label the prompt, or every document of --documents, with the file's policy."""
    clf = load_classifier(args.classify, model)
    load_fill(model, args.fill)
    spec = args.policy or clf.meta.get("policy", "confidence:0.9")  # the policy the file ships
    flag = args.threshold if args.threshold is not None else args.exit_layer
    if not args.policy and flag is not None:
        spec = spec.partition(":")[0]  # a flag sets the file's policy's own setting
    policy = make_policy(spec, model, args.threshold, args.min_layer, args.exit_layer,
                         args.exits, classifier=clf)
    spec += f":{flag}" if ":" not in spec and flag is not None else ""
    docs = args.documents_read or [("prompt", args.prompt)]
    n_tokens, L = int(clf.meta.get("tokens", 256)), model.config.n_layers
    docs = [(name, torch.tensor(tok.encode(text)[:n_tokens], device=model.tok_emb.device))
            for name, text in docs]
    print(f"[{model.name}: {L} layers, loaded in {time.perf_counter() - t0:.1f}s; policy {spec}; "
          f"{len(docs)} document(s), their first {n_tokens} tokens read]", file=sys.stderr)
    classify(model, clf, docs[0][1][:8], FullDepth(), Stats())  # warm-up: the first call allocates
    if not args.documents:
        return classify_one(model, clf, docs[0][1], policy, args.compare)
    rows = label_documents(model, clf, docs, policy, args.compare)
    summarise(rows, spec, args.json)


def classify_timed(model, clf, ids, policy):
    """(label probabilities, decision layer, Stats, seconds) of one document under a policy."""
    stats, t0 = Stats(), time.perf_counter()
    p, d = classify(model, clf, ids, policy, stats)
    sync(ids.device)
    return p, d, stats, time.perf_counter() - t0


def classify_one(model, clf, ids, policy, compare):
    """The prompt's label, its probability, the layer it was read at and the time."""
    p, d, stats, s = classify_timed(model, clf, ids, policy)
    print(f"{clf.labels[int(p.argmax())]} (p = {float(p.max()):.3f}), read at layer {d} of "
          f"{model.config.n_layers} in {s * 1000:.0f} ms")
    if compare:
        fp, _, _, fs = classify_timed(model, clf, ids, FullDepth())
        print(f"full depth: {clf.labels[int(fp.argmax())]} (p = {float(fp.max()):.3f}) in "
              f"{fs * 1000:.0f} ms; speed ratio {fs / s:.2f}x (ideal from the counters "
              f"{stats.ideal_speedup:.2f}x)")


def label_documents(model, clf, docs, policy, compare):
    """--documents: a line per document as it is labelled; with --compare full depth too, the
    two in alternating order. Returns the lines as dicts."""
    from tqdm import tqdm
    rows, full = [], FullDepth()
    for j, (name, ids) in enumerate(bar := tqdm(docs, desc="labelling", unit="doc")):
        runs = [("full", full), ("policy", policy)] if compare else [("policy", policy)]
        if j % 2:
            runs.reverse()
        out = {key: classify_timed(model, clf, ids, pol) for key, pol in runs}
        p, d, _, s = out["policy"]
        row = {"name": name, "label": clf.labels[int(p.argmax())], "p": round(float(p.max()), 4),
               "layer": d, "ms": round(s * 1000, 2)}
        if compare:
            row |= {"full_label": clf.labels[int(out["full"][0].argmax())],
                    "full_ms": round(out["full"][3] * 1000, 2)}
        rows.append(row)
        bar.write(f"{name}  {row['label']}  p = {row['p']:.3f}  layer {d}  {row['ms']:.0f} ms",
                  file=sys.stdout)
    return rows


def summarise(rows, spec, json_path):
    """--documents: the total time, full depth's and the throughput ratio; --json."""
    total = sum(r["ms"] for r in rows) / 1000
    summary = {"policy": spec, "documents": len(rows), "total_s": round(total, 3),
               "mean_layer": sum(r["layer"] for r in rows) / len(rows)}
    line = (f"{len(rows)} documents in {total:.2f} s, mean decision layer "
            f"{summary['mean_layer']:.1f}")
    if "full_ms" in rows[0]:
        full = sum(r["full_ms"] for r in rows) / 1000
        agree = sum(r["label"] == r["full_label"] for r in rows)
        summary |= {"full_total_s": round(full, 3), "throughput_speedup": round(full / total, 3),
                    "agree_with_full": agree}
        line += (f"; full depth {full:.2f} s: throughput {full / total:.2f}x; "
                 f"{agree}/{len(rows)} labels as full depth's")
    print(line, file=sys.stderr)
    if json_path:
        Path(json_path).write_text(json.dumps(summary | {"rows": rows}, indent=1))


if __name__ == "__main__":
    run(main)
