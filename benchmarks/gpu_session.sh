#!/usr/bin/env bash
# A time-budgeted GPU check and benchmark run, and the CPU checks that come before it.
#
#   bash benchmarks/gpu_session.sh             # on an NVIDIA GPU machine: every step below, within SESSION_BUDGET
#   bash benchmarks/gpu_session.sh install check   # only the steps named, in that order (install: the build)
#   bash benchmarks/gpu_session.sh preflight   # on any CPU box: re-check the installed stack before a GPU run
#   bash benchmarks/gpu_session.sh dry-run     # on any CPU box: every step at CPU sizes
#
# The whole run is bounded by SESSION_BUDGET (seconds, default 450): the steps run in the order of the value of what
# they tell, each bounded by its own cap and by what is left of the budget, so the run ends inside the budget and a
# run cut short still leaves what it did. The tested stack it was prepared for: Python 3.12, torch 2.11.0+cu130,
# torchvision 0.26.0, triton 3.6.0, timm, pytest (where it has run: README, "What has run where").
#
# Steps (expected wall time on an H200, estimated from the CPU dry run and compile times: NOT measured):
#   machine   nvidia-smi, versions                                                   ~5 s
#   install   build into build/stacks/<stack>/ (CUDA kernels for the visible GPU); on a failed CUDA build, a
#             CPU-kernels-only build, so that the Triton steps still run         ~60-180 s (cap 240)
#   check     benchmarks/gpu_tasks.py check: every GPU backend, fp32/bf16/fp16, forward + five gradients vs
#             float64, six model shapes + the test suite's odd shapes, 12 processes (Triton compiles)  ~60-120 s
#             (cap 180)
#   sanitize  NVIDIA compute-sanitizer, memcheck, racecheck, synccheck and initcheck, each over one small forward +
#             backward per kernel family (CUDA tensor cores bf16 and tf32, CUDA SIMT fp32, Triton bf16 and fp32),
#             PyTorch's caching allocator off so that memcheck sees each tensor's own bounds  ~60-90 s (cap 120)
#   bench     dynamixer-bench: every backend vs eager and torch.compile (COMPILE_MODE, default 'default'),
#             bf16, 128 images, six shapes, fwd and fwd+bwd                       ~60-120 s (cap 150)
#   train     dynamixer-bench --model dynamixer_s --optimizer adamw: the training step (fp32 weights, bf16
#             autocast, 128 images), checked against the float64 upstream network  ~30-60 s (cap 90)
#   tests     pytest: the backend grid, the CUDA and Triton cases and determinism on the GPU  ~60-90 s (cap 120)
#   autotune  dynamixer-bench against torch.compile(mode="max-autotune") at s1 and l1  ~60-120 s (cap 150)
#   tune      benchmarks/gpu_tasks.py tune: Triton launch-table sweep with whatever time is left
# Everything lands in $OUT (default ./gpu_out): summary.txt (printed last) and session.tgz (every log and JSON),
# repacked after each step, so that a run stopped early still leaves what was done.
#
# preflight (CPU): the checks that need no GPU, under whatever python/torch/triton is on PATH:
#   1. build this checkout into build/stacks/py<ver>-torch<ver>-triton<ver>/ (a copy of the tracked and untracked
#      files, built with pip --target: the checkout's own dynamixer_ops/_C*.so and the venv's editable install
#      stay untouched, so two stacks can be checked from one checkout without rebuilding over each other);
#   2. a subset of the suite (PREFLIGHT_TESTS, default below; "tests" for all) on that build, Triton under
#      the interpreter (tests/conftest.py);
#   3. tools/triton_resource_usage.py --arch 90 with the installed Triton's own compiler and ptxas: every kernel at
#      every model shape in bf16, fp16, fp32 and fp32 with tf32 dots must compile and fit shared memory.
#   Run it in a venv of the tested stack (above), then again in a venv of the pinned stack (README's commands).
# dry-run (CPU): the same build, then every session step with CPU sizes (TRITON_INTERPRET=1).
#
# Knobs: SESSION_BUDGET=S (seconds for the whole session), OUT=DIR, COMPILE_MODE=M (torch.compile mode of the
# bench step), MAX_JOBS=N (build jobs), PREFLIGHT_TESTS="...", PREFLIGHT_SHAPES="s1 l1 ..." (resource check),
# CAP_SCALE=K (each step's time cap times K; default 1 on the GPU, 10 on a CPU, where everything is slower).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
SELF=$ROOT/benchmarks/gpu_session.sh
START=$(date +%s)
failed=0

MODE=session
case "${1:-}" in
  preflight|dry-run|__fn) MODE=$1; shift ;;
esac
case $MODE in
  session) BUDGET=${SESSION_BUDGET:-450}; DEVICE=cuda; CAP_SCALE=${CAP_SCALE:-1} ;;
  preflight|dry-run) BUDGET=${SESSION_BUDGET:-100000}; DEVICE=cpu; CAP_SCALE=${CAP_SCALE:-10}
                     export TRITON_INTERPRET=${TRITON_INTERPRET:-1} ;;
esac

FN=(bash "$SELF" __fn)   # "${FN[@]}" FUNCTION ARGS...: a function of this script as a command for timeout

pack() {   # $OUT holds two files, rewritten after every step
  cp "$SUMMARY" "$OUT/summary.txt"
  tar czf "$OUT/session.tgz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/session.tgz.tmp" "$OUT/session.tgz"
}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

run_step() {   # run_step NAME CAP_SECONDS COMMAND...: log to $WORK/NAME.log, bounded by CAP and the budget
  local name=$1 cap=$(( $2 * CAP_SCALE )); shift 2
  local limit=$cap remaining
  remaining=$(( $(left) - 15 ))         # 15 s kept for packing and the summary
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  if [ "$limit" -lt 10 ]; then
    printf '%-9s %-8s %5s s  %s\n' "$name" "SKIPPED" 0 "no time left in SESSION_BUDGET=$BUDGET" >> "$SUMMARY"
    echo "=== $name: skipped, no time left"
    return 0
  fi
  echo "=== $name (limit ${limit} s): $*"
  local t0=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - t0 )) status=ok
  [ $rc -ne 0 ] && status="FAIL($rc)"
  [ $rc -eq 124 ] && status="TIMEOUT"
  [ $rc -ne 0 ] && failed=$((failed + 1))
  local gist   # the one line of the log that says how it went
  gist=$(grep -m1 -E '^(check summary|[0-9]+ (passed|failed)|=+ .*(passed|failed)|every kernel|[0-9]+ kernel|no compute-san)' \
         "$WORK/$name.log" | cut -c1-150)
  printf '%-9s %-8s %5s s  %s\n' "$name" "$status" "$took" "$gist" >> "$SUMMARY"
  tail -n 30 "$WORK/$name.log"
  echo "=== $name: $status after $took s"
  pack
  return $rc
}

# ---- the build: a copy of this checkout, built with pip --target, used by every later step ----------------
STACK=${STACK:-$("$PY" -c "import sys, torch, triton
print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-triton{triton.__version__}')" \
                  2>/dev/null || echo unknown)}
STACK_DIR=$ROOT/build/stacks/$STACK
SRC=$STACK_DIR/src
SITE=$STACK_DIR/site
export STACK PYTHON=$PY

copy_tree() {   # the checkout's tracked and untracked-but-not-ignored files into $SRC (its build/ objects kept)
  mkdir -p "$SRC"
  find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z -co --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$SRC" -xf -
  else   # a copy of the files without .git: everything but outputs
    tar -C "$ROOT" --exclude=./build --exclude=./.git --exclude='*.so' --exclude=__pycache__ --exclude=./gpu_out \
      -cf - . | tar -C "$SRC" -xf -
  fi
}

build_stack() {   # build_stack [ENV=VALUE...]: pip install --target $SITE from $SRC
  copy_tree
  env "$@" MAX_JOBS=${MAX_JOBS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))} "$PY" -m pip install -v --no-build-isolation \
    --no-deps --upgrade --target "$SITE" "$SRC" 2>&1 | grep -E "dynamixer_ops:|error|Error|Successfully" ;
  local rc=${PIPESTATUS[0]}
  [ $rc -eq 0 ] || return $rc
  # every later step imports this build, whatever the venv has installed (-P / PYTHONSAFEPATH: not the cwd)
  PYTHONPATH=$SITE PYTHONSAFEPATH=1 "$PY" -c "
import dynamixer_ops as d, os
assert os.path.dirname(d.__file__).startswith('$SITE'), d.__file__
print('dynamixer_ops from', os.path.dirname(d.__file__))
print('available:', {dev: d.available_backends(dev) for dev in ('cpu', 'cuda')})
print('unavailable:', d.unavailable_backends())"
}

step_install() {
  run_step install 240 "${FN[@]}" build_stack && return 0
  echo "=== install: the full build failed; building the CPU kernels only so that the Triton steps still run"
  run_step install-cpu 120 "${FN[@]}" build_stack DYNAMIXER_OPS_BUILD_CUDA=0
}

in_build() {   # in_build COMMAND...: run in the copy, importing the build
  (cd "$SRC" && PYTHONPATH=$SITE PYTHONSAFEPATH=1 "$@")
}

# ---- steps ----------------------------------------------------------------------------------------------------
step_machine() {
  { date -u; uname -a; nvidia-smi 2>&1 | head -20; "$PY" -c "
import sys, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('gpu:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"; } > "$WORK/machine.txt" 2>&1
  grep -E "^python|^gpu" "$WORK/machine.txt" | tee -a "$SUMMARY"
}

# One small forward + backward per kernel family, for compute-sanitizer: N = 7 sequences of L = 14, S = 3 (the
# tensor-core kernels' two row tiles and a ragged last block), the five gradients.
SANITIZE_WORKLOAD='
import sys, torch, dynamixer_ops
from dynamixer_ops import dynamic_mix
device = sys.argv[1]
available = dynamixer_ops.available_backends(device)
N, L, C, S, d = 7, 14, 48, 3, 2
for backend, dtype, tf32 in [("cuda", torch.bfloat16, False), ("cuda", torch.float32, True),
                             ("cuda", torch.float32, False), ("triton", torch.bfloat16, False),
                             ("triton", torch.float32, False)]:
    name = f"{backend} {str(dtype)[6:]}" + (" tf32" if tf32 else "")
    if backend not in available:
        print(f"{name}: backend not available here, skipped")
        continue
    torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator().manual_seed(0)
    leaves = [(torch.randn(shape, generator=g) * scale).to(device, dtype).requires_grad_()
              for shape, scale in [((N, L, C), 1.0), ((S * d, C), C ** -0.5), ((S * d,), 0.1),
                                   ((L * L, L * d), (L * d) ** -0.5), ((L * L,), 0.1)]]
    y = dynamic_mix(*leaves, S, backend=backend)
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{name}: forward + backward ran, sum |y| {y.float().abs().sum().item():.4g}, "
          f"sum |grad_x| {grads[0].float().abs().sum().item():.4g}")
'

find_sanitizer() {   # compute-sanitizer: PATH, the toolkit (CUDA_HOME or nvcc's), the nvidia wheels
  local top
  command -v compute-sanitizer && return 0
  top=${CUDA_HOME:-$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)}
  for c in "$top/bin/compute-sanitizer" "$top/compute-sanitizer/compute-sanitizer" \
           $("$PY" -c "import nvidia, os; print(*nvidia.__path__)" 2>/dev/null | xargs -I{} sh -c \
             'ls {}/*/bin/compute-sanitizer {}/*/compute-sanitizer/compute-sanitizer 2>/dev/null'); do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

sanitize_all() {   # sanitize_all MODE DEVICE: each tool over the workload; any report fails the step (--error-exitcode)
  local mode=$1 device=$2 cs rc=0 tool
  if [ "$mode" = dry-run ]; then
    cs=$(find_sanitizer) || cs="compute-sanitizer (not found here)"
    in_build "$PY" -c "$SANITIZE_WORKLOAD" "$device" || rc=1
    for tool in memcheck racecheck synccheck initcheck; do
      echo "dry-run: on the GPU: PYTORCH_NO_CUDA_MEMORY_CACHING=1 $cs --tool $tool --error-exitcode 1" \
           "--print-limit 20 $PY -c \"\$SANITIZE_WORKLOAD\" cuda"
    done
    [ $rc -eq 0 ] && echo "every kernel family ran (dry run: no compute-sanitizer on a CPU)"
    return $rc
  fi
  cs=$(find_sanitizer) || { echo "no compute-sanitizer (PATH, the CUDA toolkit, the nvidia wheels)"; return 3; }
  echo "$cs: $("$cs" --version 2>&1 | tail -n1)"
  for tool in memcheck racecheck synccheck initcheck; do
    echo "--- $tool"
    in_build env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" -c "$SANITIZE_WORKLOAD" cuda 2>&1 | tail -n 40
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$tool: FAILED"; rc=1; }
  done
  [ $rc -eq 0 ] && echo "every kernel family clean under memcheck, racecheck, synccheck and initcheck"
  return $rc
}

step_sanitize() {
  run_step sanitize 120 "${FN[@]}" sanitize_all "$MODE" "$DEVICE"
}

BENCH_SIZE=(--batch 128 --shapes all --dtype bfloat16)
[ "$MODE" = dry-run ] && BENCH_SIZE=(--sequences 4 --shapes s2 --dtype float32 --warmup 1 --repeat 4 --rounds 1)

step_check() {
  local extra=(--workers 12)
  [ "$MODE" = dry-run ] && extra=(--workers 2 --dry-run)
  run_step check 180 "${FN[@]}" in_build "$PY" benchmarks/gpu_tasks.py check --device "$DEVICE" --json "$WORK/check.json" "${extra[@]}"
}

step_bench() {
  run_step bench 150 "${FN[@]}" in_build "$PY" -m dynamixer_ops.bench --device "$DEVICE" "${BENCH_SIZE[@]}" --direction fwd fwdbwd \
    --backends all --compile-mode "${COMPILE_MODE:-default}" --json "$WORK/bench.json" --plain
}

TRAIN_SIZE=(--batch 128 --dtype float32 --autocast bfloat16 --backends eager cuda triton)
[ "$MODE" = dry-run ] && TRAIN_SIZE=(--batch 2 --img-size 28 --dtype float32 --backends eager cpu --warmup 1 --repeat 4
                                     --rounds 1)

step_train() {
  run_step train 90 "${FN[@]}" in_build "$PY" -m dynamixer_ops.bench --device "$DEVICE" --model dynamixer_s \
    --direction fwdbwd --optimizer adamw "${TRAIN_SIZE[@]}" --json "$WORK/train.json" --plain
}

step_tests() {
  local tests=(tests/test_dynamic_mix.py tests/test_cuda_kernel.py tests/test_triton.py tests/test_triton_versions.py
               tests/test_determinism.py)
  local extra=()
  [ "$MODE" = dry-run ] && extra=(-k "transposed_input or version_check")
  run_step tests 120 "${FN[@]}" in_build "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider --junitxml="$WORK/tests.xml" "${extra[@]}"
}

step_autotune() {
  local size=(--batch 128 --shapes s1 l1 --dtype bfloat16)
  [ "$MODE" = dry-run ] && size=("${BENCH_SIZE[@]}")
  run_step autotune 150 "${FN[@]}" in_build "$PY" -m dynamixer_ops.bench --device "$DEVICE" "${size[@]}" --direction fwd fwdbwd \
    --backends eager compile triton cuda --compile-mode max-autotune --json "$WORK/bench_autotune.json" --plain
}

step_tune() {
  local budget=$(( $(left) - 45 )) extra=()
  [ "$MODE" = dry-run ] && { budget=60; extra=(--dry-run); }
  if [ "$budget" -lt 20 ]; then
    printf '%-9s %-8s %5s s  %s\n' tune SKIPPED 0 "no time left" >> "$SUMMARY"
    return 0
  fi
  run_step tune $(( budget + 30 )) "${FN[@]}" in_build "$PY" benchmarks/gpu_tasks.py tune --device "$DEVICE" --budget "$budget" \
    --json "$WORK/tune.json" "${extra[@]}"
}

step_preflight_tests() {
  local tests=(${PREFLIGHT_TESTS:-tests/test_triton.py tests/test_triton_versions.py tests/test_jit_build.py
               tests/test_cuda_kernel.py tests/test_dynamic_mix.py})
  # the suite's own sm_90 compile test runs the same two commands as step_resources: not twice
  run_step suite 100000 "${FN[@]}" in_build env DYNAMIXER_OPS_TEST_TRITON_COMPILE=0 "$PY" -m pytest "${tests[@]}" \
    -q -p no:cacheprovider -rs
}

step_resources() {
  local shapes=()
  [ -n "${PREFLIGHT_SHAPES:-}" ] && shapes=(--shapes $PREFLIGHT_SHAPES)
  run_step sm90 100000 "${FN[@]}" in_build env -u TRITON_INTERPRET "$PY" tools/triton_resource_usage.py --arch 90 \
    --dtype bfloat16 float16 float32 "${shapes[@]}"
  run_step sm90-tf32 100000 "${FN[@]}" in_build env -u TRITON_INTERPRET "$PY" tools/triton_resource_usage.py --arch 90 \
    --dtype float32 --tf32 "${shapes[@]}"
}

summary() {
  {
    echo
    echo "=== session summary ($MODE, stack $STACK, $(( $(date +%s) - START )) s of SESSION_BUDGET=$BUDGET; $failed step(s) failed)"
    cat "$SUMMARY"
    for f in check train tune bench autotune; do
      [ -f "$WORK/$f.log" ] || continue
      echo "--- $f"
      case $f in
        check) grep -A 40 "^check summary" "$WORK/$f.log" | head -40 ;;
        tune) grep -A 20 "^tune: best" "$WORK/$f.log" ;;
        bench|autotune|train) grep -v -E "^\s*$|^\[" "$WORK/$f.log" | tail -n 45 ;;
      esac
    done
  } > "$WORK/summary_tail.txt"
  cat "$WORK/summary_tail.txt" >> "$SUMMARY"
  pack
  echo "outputs: $OUT/summary.txt, $OUT/session.tgz (work folder $WORK)"
  cat "$SUMMARY"
}

if [ "$MODE" = __fn ]; then
  "$@"
  exit $?
fi
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"

case $MODE in
  preflight)
    step_machine
    run_step install 100000 "${FN[@]}" build_stack || { summary; exit 1; }
    step_preflight_tests
    step_resources ;;
  dry-run|session)
    steps=("$@")
    [ ${#steps[@]} -eq 0 ] && steps=(machine install check sanitize bench train tests autotune tune)
    for s in "${steps[@]}"; do
      case $s in
        machine) step_machine ;;
        install) step_install || { [ "$MODE" = dry-run ] && { summary; exit 1; }; } ;;
        check) step_check ;;
        sanitize) step_sanitize ;;
        bench) step_bench ;;
        train) step_train ;;
        tests) step_tests ;;
        autotune) step_autotune ;;
        tune) step_tune ;;
        *) echo "unknown step $s (machine install check sanitize bench train tests autotune tune)"; exit 2 ;;
      esac
    done ;;
esac
summary
exit $failed
