#!/usr/bin/env bash
# fastlm GPU check: ONE command for a GPU machine with no network (H200 image: Python 3.12,
# torch 2.11, triton 3.6, transformers 5.17, pytest-timeout, pytest-xdist), done in <= 8 min.
#
#   FASTLM_GIT_COMMIT=<sha> bash bench/gpu_check.sh     # on the GPU machine (its copy has no .git)
#   GPU_CHECK_DRY_RUN=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh   # every stage on the CPU, tiny (CI)
#
# Stages, each its own process under `timeout` with its own budget (GPU_CHECK_<STAGE>_S overrides
# it, e.g. GPU_CHECK_TESTS_TRITON_S), all inside GPU_CHECK_TOTAL_S (480 s; a stage gets what is
# left, or is not run); a failed or timed-out stage is recorded and the next one runs:
#   nvidia-smi, versions (python packages; gcc, nvcc, ninja)
#   build            CUDA extension, sm_90 only, MAX_JOBS=16, out of the tree (build/gpu_check), in the
#                    BACKGROUND while the torch and triton passes run; installed into fastlm/ (any
#                    extension there is removed first) only for the cuda pass, which skips without it
#   tests_torch      pytest -m gpu --gpu-backend torch,reference   (PyTorch's own kernels: no build)
#   tests_triton     pytest -m gpu --gpu-backend triton
#   tests_cuda       pytest -m gpu --gpu-backend cuda,undeclared, CUDA_LAUNCH_BLOCKING=1
#                    (every pass: FASTLM_TRITON_AUTOTUNE=0, a thread-method timeout per test,
#                    pytest-xdist workers that are replaced when one dies, the gpu_verification
#                    plugin recording which kernels each test called on the GPU)
#   info, verification (records -> gpu_verification.json)
#   bench_training   end to end, BERT-base MLM + classification, Llama-1B causal LM: HF sdpa vs each
#                    fastlm tier in its own process; then bench_attention, bench_softmax,
#                    bench_cross_entropy and every other bench/bench_*.py taking --gpu-check
# Results go to bench/results/<device>/ (h200 on an H200; never bench/results itself; the dry run:
# a temporary folder): gpu_check.md (summary), gpu_verification.json, each bench's files.  With
# $OUT set, $OUT receives gpu_check.md, gpu_verification.json (as soon as it exists) and
# gpu_check_files.tar.gz (bench/results/<device>/ to extract at the repo root, and the stage logs).
# Then: python bench/gpu_verification.py changes bench/results/<device>/gpu_verification.json
# Exit status 0 only when every stage was ok (or skipped, or found no tests).
set -u
# One brace group: bash parses all of it before running any, so editing the file mid-run is safe.
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGDIR=${GPU_CHECK_LOGDIR:-${TMPDIR:-/tmp}/fastlm_gpu_check_$STAMP}
mkdir -p "$LOGDIR"
touch "$LOGDIR/start"
: >"$LOGDIR/stages.tsv"

budget() {  # budget NAME DEFAULT_S: GPU_CHECK_<NAME>_S or the default
  local var="GPU_CHECK_$(echo "$1" | tr '[:lower:]-' '[:upper:]_')_S"
  echo "${!var:-$2}"
}
if [ "$DRY" = 1 ]; then  # a shared 2-core machine: everything slower, few test files, tiny models
  TOTAL=$(budget total 900)
  SIZE_FLAG=--dry-run
  TESTS=${GPU_CHECK_TESTS:-tests/test_softmax.py tests/test_attention.py tests/test_attention_cpu.py}
  WORKERS=${GPU_CHECK_PYTEST_WORKERS:-2}
  BUILD_ENV=(FASTLM_SKIP_CUDA_BUILD=1 MAX_JOBS=2)
  S_BUILD=600 S_TESTS=240 S_INFO=60 S_TRAINING=300 S_BENCH=150
else
  TOTAL=$(budget total 480)
  SIZE_FLAG=--gpu-check
  TESTS=${GPU_CHECK_TESTS:-tests}
  WORKERS=${GPU_CHECK_PYTEST_WORKERS:-4}
  BUILD_ENV=(TORCH_CUDA_ARCH_LIST=9.0 "MAX_JOBS=${MAX_JOBS:-16}" FASTLM_FORCE_CUDA_BUILD=1)
  S_BUILD=300 S_TESTS= S_INFO=20 S_TRAINING=140 S_BENCH=
fi
export PYTHONPATH="$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_INTERPRET=0  # Triton compiles for the GPU (the dry run's Triton rows skip: CPU tensors)
export GPU_VERIFICATION_RECORDS="$LOGDIR/test_records.jsonl"
: >"$GPU_VERIFICATION_RECORDS"
if [ -z "${FASTLM_GIT_COMMIT:-}" ]; then
  FASTLM_GIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  [ "$FASTLM_GIT_COMMIT" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] \
    && FASTLM_GIT_COMMIT="$FASTLM_GIT_COMMIT-dirty"
fi
export FASTLM_GIT_COMMIT

limit_for() {  # limit_for BUDGET_S: the budget, cut to what the total leaves (15 s kept for the report)
  local left=$(( TOTAL - 15 - ($(date +%s) - START) ))
  echo $(( $1 < left ? $1 : left ))
}
# stage NAME BUDGET_S CMD...: run under `timeout` (whole process group), log to $LOGDIR/NAME.log,
# record "name<TAB>status<TAB>seconds" in stages.tsv; returns the command's exit status.
stage() {
  local name=$1 limit t0 rc status
  limit=$(limit_for "$2")
  shift 2
  if [ "$limit" -lt 5 ]; then
    printf '%s\tnot run (total budget %ss spent)\t0\n' "$name" "$TOTAL" >>"$LOGDIR/stages.tsv"
    echo "=== [$name] not run: total budget spent"
    return 124
  fi
  echo "=== [$name] limit ${limit}s: $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    5) status="no tests collected" ;;  # pytest: nothing of this backend in the tree (yet)
    124|137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >>"$LOGDIR/stages.tsv"
  tail -n "${GPU_CHECK_TAIL:-6}" "$LOGDIR/$name.log" | cut -c1-300
  echo "=== [$name] $status"
  return $rc
}
skip_stage() {  # skip_stage NAME WHY
  printf '%s\tskipped (%s)\t0\n' "$1" "$2" >>"$LOGDIR/stages.tsv"
  echo "=== [$1] skipped: $2"
}

# ---------------------------------------------------------------------------- the machine
if command -v nvidia-smi >/dev/null; then stage nvidia-smi 15 nvidia-smi; else skip_stage nvidia-smi "no nvidia-smi"; fi
stage versions 30 "$PY" - <<'PY'
import importlib.metadata as md, os, platform, torch
def v(n):
    try: return md.version(n)
    except md.PackageNotFoundError: return "not installed"
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (no GPU)'}")
print(f"versions: python {platform.python_version()} · torch {torch.__version__} · triton {v('triton')} · "
      f"transformers {v('transformers')} · CUDA {torch.version.cuda} · pytest-xdist {v('pytest-xdist')} · "
      f"pytest-timeout {v('pytest-timeout')} · commit {os.environ.get('FASTLM_GIT_COMMIT')}")
PY
stage toolchain 15 bash -c '
  nvcc=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null)
  echo "toolchain: gcc $(gcc -dumpfullversion 2>/dev/null || echo "not found") · nvcc $(
    [ -n "$nvcc" ] && "$nvcc" --version | sed -n "s/.*release \([^,]*\),.*/\1/p" || echo "not found") · ninja $(
    ninja --version 2>/dev/null || echo "not found")"'
DEVICE=$(sed -n 's/^device: //p' "$LOGDIR/versions.log")
SLUG=$(echo "${DEVICE:-unknown}" | tr '[:upper:]' '[:lower:]' | sed 's/^nvidia //; s/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
if [ "$DRY" = 1 ]; then RESULTS=${GPU_CHECK_RESULTS:-$LOGDIR/results}; else RESULTS=${GPU_CHECK_RESULTS:-$ROOT/bench/results/$SLUG}; fi
mkdir -p "$RESULTS"
export FASTLM_BENCH_RESULTS=$RESULTS

# ------------------------------------------------------- build (background) and the test passes
# The source tree is the package (fastlm.kernels: a link to kernels/, which git ignores).  The
# passes test exactly this tree: no compiled extension until this tree's own build is installed.
[ -e fastlm/kernels ] || ln -s ../kernels fastlm/kernels
rm -f fastlm/_C*.so fastlm/_C.digest
BUILD_DIR=$ROOT/build/gpu_check
if command -v flock >/dev/null 2>&1; then LOCK=(flock /tmp/fastlm-build.lock); else LOCK=(); fi
stage build "$(budget build "$S_BUILD")" ${LOCK[@]+"${LOCK[@]}"} nice -n 5 env "${BUILD_ENV[@]}" "$PY" setup.py \
  build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/temp" &
BUILD_PID=$!

PYTEST_ARGS=(-q -rfE -m gpu -p gpu_verification -p no:cacheprovider
             --timeout "${GPU_CHECK_TEST_TIMEOUT_S:-60}" --timeout-method thread)
[ "$WORKERS" != 0 ] && PYTEST_ARGS+=(-n "$WORKERS" --max-worker-restart "$(( 4 * WORKERS ))")
tests_pass() {  # tests_pass NAME BUDGET_S BACKENDS [VAR=value ...]: one pytest process for these backends
  local name=$1 limit=$2 backends=$3
  shift 3
  # shellcheck disable=SC2086
  stage "tests_$name" "$(budget "tests_$name" "${S_TESTS:-$limit}")" env FASTLM_TRITON_AUTOTUNE=0 "$@" \
    "$PY" -m pytest $TESTS --gpu-backend "$backends" "${PYTEST_ARGS[@]}" --junitxml "$LOGDIR/tests_$name.xml" \
    ${GPU_CHECK_PYTEST_ARGS:-}
}
tests_pass torch 60 torch,reference
tests_pass triton 120 triton
wait "$BUILD_PID"
if [ "$(awk -F'\t' '$1=="build"{print $2}' "$LOGDIR/stages.tsv")" = ok ]; then
  cp "$BUILD_DIR"/lib/fastlm/_C*.so "$BUILD_DIR"/lib/fastlm/_C.digest fastlm/ && echo "=== build installed into fastlm/"
fi
stage info "$(budget info "$S_INFO")" "$PY" -m fastlm info
tests_pass cuda 75 cuda,undeclared CUDA_LAUNCH_BLOCKING=1

INCOMPLETE=()
grep -q $'^tests_[a-z]*\t\\(TIMED OUT\\|not run\\)' "$LOGDIR/stages.tsv" && INCOMPLETE=(--incomplete)
stage verification 30 "$PY" bench/gpu_verification.py fold "$GPU_VERIFICATION_RECORDS" --out "$RESULTS/gpu_verification.json" \
  --md "$LOGDIR/verification.md" --device "${DEVICE:-unknown}" ${INCOMPLETE[@]+"${INCOMPLETE[@]}"}
[ -n "${OUT:-}" ] && [ -f "$RESULTS/gpu_verification.json" ] && mkdir -p "$OUT" && cp "$RESULTS/gpu_verification.json" "$OUT/"

# ------------------------------------------------------------------------------- benchmarks
LIMIT=$(limit_for "$(budget bench_training "$S_TRAINING")")
stage bench_training "$LIMIT" "$PY" bench/bench_training.py $SIZE_FLAG --budget-s $(( LIMIT > 40 ? LIMIT - 20 : LIMIT / 2 ))
stage bench_attention "$(budget bench_attention "${S_BENCH:-50}")" "$PY" bench/bench_attention.py $SIZE_FLAG
for op in softmax cross_entropy; do
  stage "bench_$op" "$(budget "bench_$op" "${S_BENCH:-$([ $op = softmax ] && echo 15 || echo 20)}")" \
    "$PY" "bench/bench_$op.py" $SIZE_FLAG
done
for f in bench/bench_*.py; do  # every other bench script that takes the shared --gpu-check flag
  name=$(basename "$f" .py)
  case $name in bench_training|bench_attention|bench_softmax|bench_cross_entropy) continue ;; esac
  grep -q -e '--gpu-check' -e 'harness.arg_parser' "$f" || continue
  stage "$name" "$(budget "$name" "${S_BENCH:-25}")" "$PY" "$f" $SIZE_FLAG
done

# ----------------------------------------------------------------------------------- report
for csv in "$RESULTS"/*.csv; do  # tables for the benches that wrote none of their own this run
  md="${csv%.csv}.md"
  [ -f "$csv" ] && [ "$csv" -nt "$LOGDIR/start" ] || continue
  [ -f "$md" ] && [ "$md" -nt "$csv" ] && continue
  "$PY" bench/report.py "$csv" >"$LOGDIR/report_$(basename "$csv" .csv).log" 2>&1 \
    || printf '%s\tFAILED\t0\n' "report_$(basename "$csv" .csv)" >>"$LOGDIR/stages.tsv"
done
stage_table() {
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$LOGDIR/stages.tsv"
}
MD="$RESULTS/gpu_check.md"
{
  echo "# fastlm GPU check: ${DEVICE:-unknown device}, $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 1 ] && echo ' (DRY RUN on CPU, tiny sizes)')"
  echo
  sed -n 's/^versions: //p' "$LOGDIR/versions.log"
  echo
  sed -n 's/^toolchain: //p' "$LOGDIR/toolchain.log"
  echo
  echo "## Stages (total $(( $(date +%s) - START )) s of a ${TOTAL} s budget)"
  echo
  stage_table
  echo
  echo "## Tests on the device: kernels called per op and backend"
  echo
  if [ -f "$LOGDIR/verification.md" ]; then cat "$LOGDIR/verification.md"; else echo "(no verification record)"; fi
  for csv in "$RESULTS"/*.csv; do
    md="${csv%.csv}.md"
    [ -f "$csv" ] && [ "$csv" -nt "$LOGDIR/start" ] && [ -f "$md" ] && { echo; cat "$md"; }
  done
} >"$MD"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$MD" "$OUT/gpu_check.md"
  TAR=(-C "$(dirname "$LOGDIR")" "$(basename "$LOGDIR")")
  case $RESULTS in "$LOGDIR"/*) ;; "$ROOT"/*) TAR+=(-C "$ROOT" "${RESULTS#"$ROOT"/}") ;; *) TAR+=(-C "$(dirname "$RESULTS")" "$(basename "$RESULTS")") ;; esac
  tar czf "$OUT/gpu_check_files.tar.gz" "${TAR[@]}" || echo "gpu_check: could not write the tarball"
fi
echo
cat "$MD"
echo
echo "logs: $LOGDIR   results: $RESULTS"
stage_table
# Exit status: 0 only when every stage was ok, skipped, or found no tests.
awk -F'\t' '$2 != "ok" && $2 !~ /^skipped/ && $2 != "no tests collected" {bad = 1} END {exit bad}' "$LOGDIR/stages.tsv"
exit $?
}
