#!/usr/bin/env bash
# The whole suite: lint, types, then every test (BPF tests need root; they say why when they skip).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check . || exit 1
.venv/bin/mypy || exit 1
.venv/bin/python -m pytest -q "$@"
code=$?
[ $code -eq 5 ] && { echo "no tests ran"; exit 1; }
exit $code
