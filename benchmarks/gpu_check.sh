#!/usr/bin/env bash
# The checks that need a GPU, in one run of under 8 minutes on one H100. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh                       # everything under runs/gpu_check
#     OUT=/tmp/gc GPU_CHECK_STAGES="smoke parity" bash benchmarks/gpu_check.sh   # a subset, elsewhere
#
# Stages (each under its own time limit; a failed or timed-out stage does not stop the next ones):
#   speed   benchmarks/speed.py --device cuda --bf16 --only inversion    -> $OUT/speed_cuda.json
#   smoke   the smoke job on one GPU through Ray Train (NCCL)              -> $OUT/smoke_gpu/report.json
#   parity  benchmarks/parity.py --gpu --noise-floor (in process twice vs Ray, 1 vs N workers) -> $OUT/parity.json
#   cost    benchmarks/cost_model.py (CPU only)                           -> $OUT/cost_model.json
# Every stage's output goes to $OUT/<stage>.log, its exit status and seconds to $OUT/stages.tsv; a summary
# of the figures is printed at the end and written to $OUT/summary.txt. Exit status: 0 only if every
# selected stage succeeded.
set -euo pipefail

OUT=${OUT:-runs/gpu_check}
STAGES=${GPU_CHECK_STAGES:-speed smoke parity cost}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
# Limits in seconds: 480, and 20 of kill grace; with nvidia-smi and the summary the whole stays near 8 minutes.
# Measured on one H200 (16 cores): speed 24 s, smoke 132-184 s, parity 173-197 s, cost 19-21 s. On Ray each step pays about
# 40 s of process start-up (synthesis actor, DDP worker group, evaluation actors, each initialising CUDA).
LIMIT_SPEED=${GPU_CHECK_LIMIT_SPEED:-60}
LIMIT_SMOKE=${GPU_CHECK_LIMIT_SMOKE:-190}
LIMIT_PARITY=${GPU_CHECK_LIMIT_PARITY:-200}
LIMIT_COST=${GPU_CHECK_LIMIT_COST:-30}

for name in $STAGES; do
    case $name in
        speed | smoke | parity | cost) ;;
        *) echo "gpu_check: unknown stage '$name' in GPU_CHECK_STAGES (stages: speed smoke parity cost)" >&2; exit 2 ;;
    esac
done
if [[ ! -f jobs/incremental.py ]]; then
    echo "gpu_check: run from the repository root (jobs/incremental.py not found)" >&2
    exit 2
fi
mkdir -p "$OUT"
printf 'stage\texit_status\tseconds\n' > "$OUT/stages.tsv"
failed=0

# stage NAME LIMIT COMMAND...: run COMMAND under `timeout`, log it, record its exit status (124: timed out).
stage() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/stages.tsv"
    if [[ $rc -ne 0 ]]; then
        echo "== $name FAILED (exit status $rc$([[ $rc -eq 124 || $rc -eq 137 ]] && echo ', timed out'))"
        failed=1
    fi
}

selected() { [[ " $STAGES " == *" $1 "* ]]; }

echo "== nvidia-smi -L"
nvidia-smi -L | tee "$OUT/gpus.txt"
echo "== python: $PYTHON ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"

if selected speed; then
    rm -f "$OUT/speed_cuda.json"
    stage speed "$LIMIT_SPEED" "$PYTHON" benchmarks/speed.py --device cuda --bf16 --only inversion --json "$OUT/speed_cuda.json"
fi
if selected smoke; then
    rm -rf "$OUT/smoke_gpu"  # a rerun must neither resume the previous run's steps nor show its report
    stage smoke "$LIMIT_SMOKE" "$PYTHON" jobs/incremental.py --preset smoke --gpu --train-workers 1 \
        --synthesis-actors 1 --run-dir "$OUT/smoke_gpu"
fi
if selected parity; then
    rm -f "$OUT/parity.json"
    stage parity "$LIMIT_PARITY" "$PYTHON" benchmarks/parity.py --gpu --noise-floor --json "$OUT/parity.json"
fi
if selected cost; then
    rm -f "$OUT/cost_model.json"
    stage cost "$LIMIT_COST" "$PYTHON" benchmarks/cost_model.py --json "$OUT/cost_model.json"
fi

echo "== summary"
"$PYTHON" -c '
import json, sys
from pathlib import Path

out, stages = Path(sys.argv[1]), sys.argv[2].split()

def load(stage, name):
    """A stage'"'"'s JSON, only if that stage ran now (older files of other stages may lie in OUT)."""
    path = out / name
    return json.loads(path.read_text()) if stage in stages and path.exists() else None

print("stages:", ", ".join("%s=%s (%s s)" % tuple(line.split("\t")) for line in (out / "stages.tsv").read_text().splitlines()[1:]))
speed = load("speed", "speed_cuda.json")
if speed:
    matmul = speed.get("matmul_gflops", 0.0)
    print("speed (cuda, bf16): float32 matmul %.0f GFLOP/s" % matmul)
    for tag in ("small_64", "mnv3_64", "mnv3_128"):
        if tag + "_inversion_vs_bare" in speed:
            share = speed.get(tag + "_bare_flops_share", 0.0)
            print("  %s: inversion/bare %.2f, bare %.0f img-it/s, bare loop %.1f TFLOP/s (%.1f%% of the matmul)"
                  % (tag, speed[tag + "_inversion_vs_bare"], speed.get(tag + "_bare_img_it_per_s", 0.0),
                     share * matmul / 1e3, 100 * share))
report = load("smoke", "smoke_gpu/report.json")
if report:
    for step in report.get("steps", []):
        print("smoke step %s: all-class mIoU %s, synthesis %s s, training %s s, %s real / %s synthetic images"
              % (step.get("step"), step.get("metrics", {}).get("all"), step.get("synthesis_seconds"),
                 step.get("training_seconds"), step.get("num_real"), step.get("num_fake")))
parity = load("parity", "parity.json")
if parity:
    runs = {k: v for k, v in parity.items() if isinstance(v, (int, float)) and k != "spread"}
    print("parity: last-step all-class mIoU %s, spread %s points, seconds %s" % (runs, parity.get("spread"), parity.get("seconds")))
cost = load("cost", "cost_model.json")
if cost:
    print("cost model at an assumed %g TFLOP/s per GPU:" % cost["assumptions"]["tflops"])
    for name, protocol in cost["protocols"].items():
        total = protocol["total"]
        worst = max(r["gpus_under_target"] or 0 for r in protocol["steps"])
        print("  %s: synthesis %.2f GPU-h, training %.2f GPU-h, at most %d GPUs per step under %g h"
              % (name, total["synthesis_gpu_hours"], total["training_gpu_hours"], worst, cost["assumptions"]["target_hours"]))
    plane = cost.get("data_plane")
    if plane:
        print("  CPU cores per GPU to feed training: %.1f (base step), %.1f (distillation step)"
              % (plane["cores_per_gpu_base"], plane["cores_per_gpu_distill"]))
' "$OUT" "$STAGES" | tee "$OUT/summary.txt"

exit "$failed"
