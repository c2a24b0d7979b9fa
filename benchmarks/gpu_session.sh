#!/usr/bin/env bash
# One session on a lent GPU machine (Python 3.12, torch 2.11+cu130, triton 3.6, timm, pytest, pytest-benchmark,
# hypothesis, rich; no registry access): build, test on the GPU, benchmark, and leave everything in $OUT.
#
#   bash benchmarks/gpu_session.sh            # every step, in order
#   bash benchmarks/gpu_session.sh install test bench-fwd bench-fwdbwd results   # or some steps
#
# Steps (each writes its log to $OUT and goes on after a failure; the exit code is the number of failed steps):
#   install       pip install --no-build-isolation --no-deps -e .  (builds the CUDA kernels), lists the backends
#   test          pytest tests on the GPU (JUnit XML too)
#   bench-fwd     dynamixer-bench, cuda bf16, 128 images, all shapes, forward, every backend + eager + compile
#   bench-fwdbwd  the same for forward+backward
#   pytest-bench  the pytest-benchmark suite (s1 and s2, bf16) as JSON, for --benchmark-compare later
#   model         dynamixer-bench --model dynamixer_s (skipped when dynamixer_ops.models is absent)
#   results       benchmarks/make_results.py on every bench JSON -> $OUT/RESULTS.md (copy it into benchmarks/)
# A tool that allows at most 10 minutes per command can run the steps one call at a time (torch.compile in
# max-autotune mode is the slow part of the bench steps: the two bench steps are apart for that reason).
#
# Knobs (environment):
#   STEP_TIMEOUT=S    stop any one step after S seconds (SIGINT first, so pytest still prints its summary) and go
#                     on with the next; 0 = no limit (default)
#   COMPILE_MODE=M    torch.compile mode of the 'compile' baseline in the bench steps (default: the CLI's,
#                     max-autotune on GPU; 'default' compiles in a fraction of the time)
# On a short lease (15 minutes of device time for every try at an issue, one command at most 10 minutes, the
# machine's start counted), one call that cannot overrun its timeout_s of 540:
#   STEP_TIMEOUT=150 bash benchmarks/gpu_session.sh install test bench-fwd bench-fwdbwd results
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-8}
# matplotlib may be missing on the lent machine: the plot is then skipped, not the run.
PLOT_OK=$(python -c "import matplotlib" 2>/dev/null && echo 1 || echo 0)
failed=0

run_step() {   # run_step NAME COMMAND...: log to $OUT/NAME.log, record the exit status
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/session.log"
  local start=$(date +%s)
  if [ "${STEP_TIMEOUT:-0}" -gt 0 ]; then
    timeout -s INT -k 20 "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  else
    "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  [ "${STEP_TIMEOUT:-0}" -gt 0 ] && [ $rc -eq 124 ] &&     # timeout's status for a command it stopped
    echo "=== $name: stopped by STEP_TIMEOUT=$STEP_TIMEOUT s (its log and outputs are partial)" | tee -a "$OUT/session.log"
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/session.log"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

step_install() {
  { nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1
  run_step install bash -c 'pip install --no-build-isolation --no-deps -e . && python -c "
import dynamixer_ops as d
print(\"available on cuda:\", d.available_backends(\"cuda\"))
print(\"unavailable:\", d.unavailable_backends())"'
}

step_test() {
  run_step test python -m pytest tests -q -rs --junitxml="$OUT/tests.xml"
}

bench() {   # bench DIRECTION
  local extra=()
  [ "$PLOT_OK" = 1 ] && extra+=(--plot "$OUT/bench_cuda_bf16_$1.png")
  [ -n "${COMPILE_MODE:-}" ] && extra+=(--compile-mode "$COMPILE_MODE")
  run_step "bench-$1" python -m dynamixer_ops.bench --device cuda --dtype bfloat16 --batch 128 --shapes all \
    --direction "$1" --backends all --json "$OUT/bench_cuda_bf16_$1.json" "${extra[@]}" --plain
}

step_pytest_bench() {
  run_step pytest-bench python -m pytest benchmarks -q --bench-device cuda --bench-dtype bfloat16 \
    --bench-shapes "s1 s2" --bench-images 128 --benchmark-json="$OUT/pytest_benchmark_cuda_bf16.json"
}

step_model() {
  if python -c "import dynamixer_ops.models, dynamixer_ops.upstream" 2>/dev/null; then
    run_step model python -m dynamixer_ops.bench --device cuda --dtype bfloat16 --model dynamixer_s --batch 128 \
      --json "$OUT/model_dynamixer_s_cuda_bf16.json" --plain
  else
    echo "=== model: skipped (dynamixer_ops.models / dynamixer_ops.upstream not in this tree)" | tee -a "$OUT/session.log"
  fi
}

step_results() {
  local jsons=("$OUT"/bench_*.json "$OUT"/model_*.json)
  local have=()
  for j in "${jsons[@]}"; do [ -f "$j" ] && have+=("$j"); done
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
  [ ${#have[@]} -gt 0 ] && run_step results python benchmarks/make_results.py "${have[@]}" --results "$OUT/RESULTS.md"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(install test bench-fwd bench-fwdbwd pytest-bench model results)
for s in "${steps[@]}"; do
  case $s in
    install) step_install ;;
    test) step_test ;;
    bench-fwd) bench fwd ;;
    bench-fwdbwd) bench fwdbwd ;;
    pytest-bench) step_pytest_bench ;;
    model) step_model ;;
    results) step_results ;;
    *) echo "unknown step $s (install test bench-fwd bench-fwdbwd pytest-bench model results)"; exit 2 ;;
  esac
done
echo "=== done: $failed step(s) failed; outputs in $OUT" | tee -a "$OUT/session.log"
exit $failed
