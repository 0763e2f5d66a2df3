#!/usr/bin/env bash
# curate's shards read by the trainers' own code: verl's RLHFDataset loads the RL shards (every <image> meets its
# image) and TRL's SFTTrainer runs one step on the SFT shards in TRL's layout (scripts/check_trainers.py).
# CURATE_TRAINERS_VENV: a venv holding curate to add verl and TRL to (CI passes .venv-newest, the newest
# transformers without vLLM, after its last use); otherwise a fresh one in a temporary folder.
# The versions are the ones tested together.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/curate-trainers-XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
venv="${CURATE_TRAINERS_VENV:-}"
if [ -z "$venv" ]; then
  venv="$work/venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet torch==2.13.0  # the CPU build scripts/install.sh pins
  "$venv/bin/pip" install --quiet -e "$repo"
  "$venv/bin/pip" install --quiet --no-deps -e "$repo/tests/support"  # curate_testkit: the tiny Qwen2-VL
fi
venv="$(cd "$venv" && pwd)"
quiet_pip() { "$venv/bin/pip" install --quiet "$@" >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }; }
quiet_pip trl==1.16.0
# verl without its dependencies: they pin transformers below 5.11 and pull its training stack. Its dataset module
# imports only these: ray and tensordict (verl/__init__ loads DataProto), omegaconf. tensordict's pyvers pins
# packaging below 26, which nothing here needs (so both go in without dependencies, theirs listed beside them).
quiet_pip --no-deps verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0
quiet_pip omegaconf==2.4.0 ray==2.60.0 cloudpickle orjson importlib_metadata
cd "$repo"  # not /tmp: a Ray session folder there (/tmp/ray) would shadow the ray package
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$venv/bin/python" scripts/check_trainers.py "$work/run"
echo "trainers check: $((SECONDS - start)) s"
