#!/bin/bash
# The checks to run on a machine with a CUDA GPU, in one go (about 5 minutes on one H200 with 16 cores):
#
#     bash docs/bench/gpu_check.sh [OUT]        # from the repository root; logs and results go to OUT (gpu-check/)
#
# 1. tests/test_devices.py, whose inference tests run once more on the GPU; 2. the rest of the suite in four
# processes of 3 threads (each PyTorch process would take every core); 3. `train --distributed` over NCCL, one process
# per GPU; 4. the shipped efficientnet_lite0 recipe trained on ../shared/data/cxr-dev (when it is there), evaluated
# and interpreted with --device cuda, and evaluated on the CPU for comparison; 5. `cxrfast demo`. Session 30 ran it
# on an H200 (docs/benchmarks.md, "On a GPU"), with the packages the machine lacked installed first.
# The tools the suite's skipped modules need (ruff, mkdocs, a browser, Jupyter) are not assumed there.
set -u
OUT=${1:-gpu-check}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # the README's venv, if there
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NO_COLOR=1
T0=$(date +%s)
t() { echo "[$(($(date +%s) - T0)) s] $*"; }
cx() { "$PYTHON" -m cxr_fast.cli "$@"; }
exec 3>&1  # `timed` reports there, past the filters its command's output goes through
timed() { local start; start=$(date +%s%N); "$@"; echo "  took $((($(date +%s%N) - start) / 1000000)) ms" >&3; }

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())") || { echo "$PYTHON has no torch"; exit 1; }
if [ "$GPUS" -lt 1 ]; then
    echo "torch sees no CUDA GPU here: this script is for a machine with one (the CPU is what CI checks)"
    exit 1
fi
nvidia-smi -L 2>/dev/null
"$PYTHON" -c "import torch, timm, fastai, captum; print('torch', torch.__version__, 'timm', timm.__version__, \
'fastai', fastai.__version__, 'captum', captum.__version__)"

t "the suite in 4 processes, in the background (logs: $OUT/suite*.log)"
SKIP="--ignore=tests/test_lint.py --ignore=tests/test_docs.py --ignore=tests/test_packaging.py --ignore=tests/test_notebook.py"
G1="tests/test_train.py tests/test_integration_cxrdev.py"
G2="tests/test_evaluate.py tests/test_interpret.py tests/test_distributed.py tests/test_audit.py tests/test_attribution.py"
G3="tests/test_manifest.py tests/test_serve.py tests/test_cli.py tests/test_io.py tests/test_ensemble.py"
REST="$SKIP --ignore=tests/test_devices.py $(for f in $G1 $G2 $G3; do echo --ignore=$f; done) tests"
i=0
for group in "$G1" "$G2" "$G3" "$REST"; do
    i=$((i + 1))
    # shellcheck disable=SC2086  # the groups are lists of words
    (OMP_NUM_THREADS=3 "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs --basetemp="$OUT/pytest$i" $group \
        > "$OUT/suite$i.log" 2>&1; echo "rc $?" >> "$OUT/suite$i.log") &
done

t "tests/test_devices.py (CPU and GPU cases)"
"$PYTHON" -m pytest -q -p no:cacheprovider -rfEs --basetemp="$OUT/pytest0" tests/test_devices.py 2>&1 | tail -5

t "train --distributed over NCCL, $GPUS process(es)"
cx data synth "$OUT/phantoms" --n-per-class 30 --size 96 > /dev/null
cx data prepare "$OUT/phantoms" --out "$OUT/phantom-data" > /dev/null
cx train --data "$OUT/phantom-data" --arch cxresnet_tiny --size 64 --epochs 2 --bs 16 --distributed --nproc "$GPUS" \
    --out "$OUT/ddp" 2>&1 | tail -2
"$PYTHON" -c "import json, sys; m = json.load(open(sys.argv[1])); print('processes:', m['processes'])" "$OUT/ddp/metrics.json"

if [ -d ../shared/data/cxr-dev ]; then
    t "cxr-dev: the efficientnet_lite0 recipe on the GPU"
    cx data prepare ../shared/data/cxr-dev --out "$OUT/cxr" 2>&1 | tail -1
    timed cx train --data "$OUT/cxr" --recipe efficientnet_lite0 --seed 0 --out "$OUT/lite" 2>&1 | grep -v "^\s*$" | tail -8
    t "evaluate and interpret with --device cuda, then evaluate on the CPU"
    timed cx evaluate "$OUT/lite" --device cuda 2>&1 | grep -i "balanced accuracy"
    cp "$OUT"/lite/eval/*/metrics.json "$OUT/metrics-gpu.json"
    timed cx interpret "$OUT/lite" --device cuda 2>&1 | tail -1
    timed cx evaluate "$OUT/lite" --force 2>&1 | grep -i "balanced accuracy"
    cp "$OUT"/lite/eval/*/metrics.json "$OUT/metrics-cpu.json"
    "$PYTHON" - "$OUT/metrics-gpu.json" "$OUT/metrics-cpu.json" <<'EOF'
import json, sys
gpu, cpu = (json.load(open(p)) for p in sys.argv[1:])
for key in ("balanced_accuracy", "macro_roc_auc", "nll_calibrated", "ece_calibrated"):
    print(f"  {key}: GPU {gpu[key]:.5f}, CPU {cpu[key]:.5f}")
EOF
else
    t "no ../shared/data/cxr-dev: the recipe check is left out"
fi

t "cxrfast demo (the README's main job)"
timed cx demo --out "$OUT/demo" 2>&1 | grep -i "best epoch\|balanced accuracy  \|report:"

t "waiting for the suite"
wait
for i in 1 2 3 4; do echo "== suite$i: $(grep -E 'passed|failed' "$OUT/suite$i.log" | tail -1)"; done
t "done"
