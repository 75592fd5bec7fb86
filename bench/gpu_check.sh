#!/usr/bin/env bash
# fastlm GPU check: ONE command for a GPU machine with no network (H200 image: Python 3.12,
# torch 2.11, triton 3.6, transformers 5.17, pytest-timeout, pytest-xdist).
#
#   bash bench/gpu_check.sh                          # on the GPU machine, from anywhere
#   FASTLM_GIT_COMMIT=<sha> bash bench/gpu_check.sh  # the copy there may have no .git
#   GPU_CHECK_DRY_RUN=1 PYTHON=/work/venv/bin/python bash bench/gpu_check.sh   # same stages, CPU, tiny
#
# Stages, each under `timeout` with its own budget (GPU_CHECK_<STAGE>_S overrides it), all
# inside GPU_CHECK_TOTAL_S (480 s; a stage is cut to what is left, or not run):
#   nvidia-smi, build (setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16,
#   FASTLM_FORCE_CUDA_BUILD=1), fastlm info, tests (pytest tests with TRITON_INTERPRET=0,
#   GPU tests included, a per-test timeout, the gpu_verification plugin recording which
#   kernels each test called on the GPU), every bench/bench_*.py with --gpu-check, report.
# If the CUDA build fails, a CPU-only build follows so the other backends are still tested.
# A failed or timed-out stage is recorded and the next stage still runs.
#
# Writes into bench/results/ (the dry run: a temporary folder instead, never bench/results):
#   gpu_check.md            device, versions, commit; bench tables; per-op/backend GPU evidence;
#                           the stage table (printed last)
#   gpu_verification.json   op -> backend -> passed / failed / incomplete / not exercised,
#                           with date and device (what the registry's verified= may cite)
#   <bench>.csv|json|md|png from each bench script
# and, when $OUT is set, copies gpu_check.md, gpu_verification.json and a tarball of the
# results and every stage log (gpu_check_files.tar.gz) into $OUT (at most 8 files come back).
set -u
# The whole script is one brace group: bash parses it completely before running any of
# it, so editing this file during a run cannot change the run.
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

if [ "$DRY" = 1 ]; then
  RESULTS=${GPU_CHECK_RESULTS:-$LOGDIR/results}
  SIZE_FLAG=--quick
  TIMING="--rep-ms 20 --warmup-ms 5"
  # A shared 2-core machine: the build may wait for the build lock, everything runs slower.
  TOTAL=${GPU_CHECK_TOTAL_S:-1200} BUILD_S=${GPU_CHECK_BUILD_S:-600} BENCH_S=${GPU_CHECK_ATTENTION_S:-200}
  OP_S=${GPU_CHECK_OP_BENCH_S:-150} FT_S=${GPU_CHECK_FINETUNE_S:-200}
  export TRITON_INTERPRET=${GPU_CHECK_TRITON_INTERPRET:-1}
  TESTS=${GPU_CHECK_TESTS:-tests/test_registry.py tests/test_bench_harness.py}
  WORKERS=${GPU_CHECK_PYTEST_WORKERS:-0}
  BUILD_ENV="FASTLM_SKIP_CUDA_BUILD=1 MAX_JOBS=2"
else
  RESULTS=${GPU_CHECK_RESULTS:-$ROOT/bench/results}
  SIZE_FLAG=--gpu-check
  TIMING=
  TOTAL=${GPU_CHECK_TOTAL_S:-480} BUILD_S=${GPU_CHECK_BUILD_S:-180} BENCH_S=${GPU_CHECK_ATTENTION_S:-70}
  OP_S=${GPU_CHECK_OP_BENCH_S:-25} FT_S=${GPU_CHECK_FINETUNE_S:-40}
  export TRITON_INTERPRET=0
  TESTS=${GPU_CHECK_TESTS:-tests}
  WORKERS=${GPU_CHECK_PYTEST_WORKERS:-4}
  BUILD_ENV="TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} FASTLM_FORCE_CUDA_BUILD=1"
fi
mkdir -p "$RESULTS"
export FASTLM_BENCH_RESULTS=$RESULTS
export PYTHONPATH="$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPU_VERIFICATION_RECORDS="$LOGDIR/test_records.jsonl"
: >"$GPU_VERIFICATION_RECORDS"
if [ -z "${FASTLM_GIT_COMMIT:-}" ]; then
  FASTLM_GIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  [ "$FASTLM_GIT_COMMIT" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] \
    && FASTLM_GIT_COMMIT="$FASTLM_GIT_COMMIT-dirty"
fi
export FASTLM_GIT_COMMIT

# stage NAME BUDGET_S CMD...: run under `timeout`, never past the total budget (15 s kept
# for the report), log to $LOGDIR/NAME.log, record "name<TAB>status<TAB>seconds".
stage() {
  local name=$1 budget=$2 limit left t0 rc status
  shift 2
  left=$(( TOTAL - 15 - ($(date +%s) - START) ))
  limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 5 ]; then
    printf '%s\tnot run (total budget %ss spent)\t0\n' "$name" "$TOTAL" >>"$LOGDIR/stages.tsv"
    echo "=== [$name] not run: total budget spent"
    return 0
  fi
  echo "=== [$name] limit ${limit}s: $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >>"$LOGDIR/stages.tsv"
  tail -n "${GPU_CHECK_TAIL:-8}" "$LOGDIR/$name.log" | cut -c1-300
  echo "=== [$name] $status"
  return $rc
}

# -------------------------------------------------------------------------------- stages
stage nvidia-smi 15 nvidia-smi

stage versions 30 "$PY" - <<'PY'
import importlib.metadata as md, os, platform, torch
def v(n):
    try: return md.version(n)
    except md.PackageNotFoundError: return "not installed"
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)"
print(f"device: {dev}")
print(f"versions: python {platform.python_version()} · torch {torch.__version__} · triton {v('triton')} · "
      f"transformers {v('transformers')} · CUDA {torch.version.cuda} · commit {os.environ.get('FASTLM_GIT_COMMIT')}")
PY
sed -n 's/^device: //p' "$LOGDIR/versions.log" >"$LOGDIR/device.txt"
DEVICE=$(cat "$LOGDIR/device.txt" 2>/dev/null)

# The source tree serves as the package: fastlm.kernels is a link to kernels/ (git ignores it).
[ -e fastlm/kernels ] || ln -s ../kernels fastlm/kernels
if command -v flock >/dev/null 2>&1; then LOCK=(flock /tmp/fastlm-build.lock); else LOCK=(); fi
stage build "$BUILD_S" ${LOCK[@]+"${LOCK[@]}"} env $BUILD_ENV "$PY" setup.py build_ext --inplace \
  || { [ "$DRY" = 1 ] || stage build_cpu_only 120 env FASTLM_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-16}" \
         "$PY" setup.py build_ext --inplace; }  # so the C++ CPU, Triton and reference tests still run

stage info 30 "$PY" -m fastlm info

PYTEST_ARGS=(-q -rfE -p gpu_verification -p no:cacheprovider --maxfail=50)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout="${GPU_CHECK_TEST_TIMEOUT_S:-120}")
[ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n "$WORKERS")
# No -x: every op's tests must run for the per-op / per-backend record.
# shellcheck disable=SC2086
stage tests "${GPU_CHECK_TESTS_S:-150}" "$PY" -m pytest $TESTS "${PYTEST_ARGS[@]}" ${GPU_CHECK_PYTEST_ARGS:-}
TESTS_STATUS=$(awk -F'\t' '$1=="tests"{print $2}' "$LOGDIR/stages.tsv")
INCOMPLETE=()
case $TESTS_STATUS in ok|"FAILED (exit 1)") ;; *) INCOMPLETE=(--incomplete) ;; esac
stage verification 30 "$PY" bench/gpu_verification.py "$GPU_VERIFICATION_RECORDS" \
  --out "$RESULTS/gpu_verification.json" --md "$LOGDIR/verification.md" --device "${DEVICE:-unknown}" ${INCOMPLETE[@]+"${INCOMPLETE[@]}"}

stage bench_attention "$BENCH_S" "$PY" bench/bench_attention.py $SIZE_FLAG $TIMING
for op in softmax cross_entropy; do
  if [ -f "bench/bench_$op.py" ]; then
    stage "bench_$op" "$OP_S" "$PY" "bench/bench_$op.py" $SIZE_FLAG $TIMING
  else
    printf '%s\tmissing (bench/bench_%s.py not in the tree)\t0\n' "bench_$op" "$op" >>"$LOGDIR/stages.tsv"
  fi
done
# Every other bench script (end-to-end fine-tuning / training steps, ...), with its size flag only.
for f in bench/bench_*.py; do
  case $(basename "$f") in bench_attention.py|bench_softmax.py|bench_cross_entropy.py) continue ;; esac
  stage "$(basename "$f" .py)" "$FT_S" "$PY" "$f" $SIZE_FLAG
done

# ------------------------------------------------------------------------------- report
for csv in "$RESULTS"/*.csv; do
  [ -f "$csv" ] && [ "$csv" -nt "$LOGDIR/start" ] || continue
  "$PY" bench/report.py "$csv" >"$LOGDIR/report_$(basename "$csv" .csv).log" 2>&1 \
    || printf '%s\tFAILED\t0\n' "report_$(basename "$csv" .csv)" >>"$LOGDIR/stages.tsv"
done

MD="$RESULTS/gpu_check.md"
{
  echo "# fastlm GPU check: ${DEVICE:-unknown device}, $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 1 ] && echo ' (DRY RUN on CPU, tiny sizes)')"
  echo
  sed -n 's/^versions: //p' "$LOGDIR/versions.log"
  echo
  for csv in "$RESULTS"/*.csv; do
    md="${csv%.csv}.md"
    [ -f "$csv" ] && [ "$csv" -nt "$LOGDIR/start" ] && [ -f "$md" ] && { cat "$md"; echo; }
  done
  echo "## Tests on the device: kernels called per op and backend"
  echo
  if [ -f "$LOGDIR/verification.md" ]; then cat "$LOGDIR/verification.md"; else echo "(no verification record)"; fi
  echo
  echo "## Stages (total $(( $(date +%s) - START )) s of a ${TOTAL} s budget)"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$LOGDIR/stages.tsv"
} >"$MD"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$MD" "$OUT/gpu_check.md"
  [ -f "$RESULTS/gpu_verification.json" ] && cp "$RESULTS/gpu_verification.json" "$OUT/"
  # logs/ = every stage log and the per-test records; results/ = the results folder.
  TAR=(-C "$(dirname "$LOGDIR")" "$(basename "$LOGDIR")")
  case $RESULTS in "$LOGDIR"/*) ;; *) TAR+=(-C "$(dirname "$RESULTS")" "$(basename "$RESULTS")") ;; esac
  tar czf "$OUT/gpu_check_files.tar.gz" "${TAR[@]}" || echo "gpu_check: could not write the tarball"
fi
echo
echo "logs: $LOGDIR   results: $RESULTS"
echo
cat "$MD"
# Exit status: 0 only when every stage was ok.
awk -F'\t' '$2 != "ok" {bad = 1} END {exit bad}' "$LOGDIR/stages.tsv"
exit $?
}
