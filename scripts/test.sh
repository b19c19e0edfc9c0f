#!/usr/bin/env bash
# Run every test tier (see tests/README.md). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q --durations=15 "$@"
