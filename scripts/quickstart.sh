#!/usr/bin/env bash
# Install curate into ./.venv (CPU torch) and run the SFT recipe on the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/curate run recipes/metis_sft.yaml --local -o runs/sft
.venv/bin/curate inspect runs/sft
