#!/usr/bin/env bash
# Set up a fresh machine: Debian's Fashion-MNIST and Chromium (when missing), a venv in .venv, scalegen with its
# web page and test tools.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
FASHION_DIR=/usr/share/datasets/fashion-mnist

if [ ! -e "$FASHION_DIR/train-images-idx3-ubyte.gz" ] && [ ! -e "$FASHION_DIR/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found in $FASHION_DIR; install dataset-fashion-mnist or pass --data FOLDER" >&2
  fi
fi

# Debian's Chromium drives the web page's browser tests (Playwright uses it; it downloads no browser of its own).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium (for the web page tests)"
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
  else
    echo "setup: chromium not found; the web page's browser tests will be skipped" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Prefer the CPU build that lies on this kind of machine's disk; elsewhere take what pip resolves (torch>=2.4).
  $PIP torch==2.13.0 2>/dev/null || $PIP "torch>=2.4"
fi
$PIP -e ".[test,web]"
echo "setup: ready ($VENV)"
