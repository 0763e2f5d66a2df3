#!/usr/bin/env bash
# Build the sdist and the wheel, install the wheel (no extras) in a clean venv outside the repository, and run a
# bundled recipe from a folder that is not the clone: `curate run starter` and `curate init` + its recipe.
# torch comes first, the CPU build scripts/install.sh pins (from pip's cache when it has it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/curate-wheel-XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
python3 -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install --quiet build
"$work/build-venv/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
ls "$work/dist"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade pip
"$work/venv/bin/pip" install --quiet torch==2.13.0
"$work/venv/bin/pip" install --quiet "$work"/dist/curate_tooluse-*.whl
cd "$work"
mkdir elsewhere && cd elsewhere
# Nothing generic at the top of site-packages; the stage packages inside curate; no test support (curate_testkit).
"$work/venv/bin/python" -c 'import importlib.util as u, curate.filters, curate.judges
assert u.find_spec("filters") is None and u.find_spec("judges") is None and u.find_spec("curate_testkit") is None'
"$work/venv/bin/curate" --version
"$work/venv/bin/curate" run starter --no-progress
"$work/venv/bin/curate" init demo
"$work/venv/bin/curate" run demo/recipe.yaml -o demo/run --no-progress
echo "wheel check: $((SECONDS - start)) s"
