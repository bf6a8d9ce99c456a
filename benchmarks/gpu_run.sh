#!/usr/bin/env bash
# The GPU row of benchmarks/RESULTS.md, in one command (see benchmarks/README.md).
#
# On the device machine (H200; torch there, no torchattacks/ART: they travel as wheels in
# .whl/, carried), from the repository root:
#     bash benchmarks/gpu_run.sh
# Local dry run on the CPU, small sizes, so the script cannot fail there for silly reasons
# (QUICK=1: a big eps, so Square has almost nothing left to attack):
#     DEVICE=cpu PY=.venv/bin/python OUT=/tmp/gpu-dry QUICK=1 bash benchmarks/gpu_run.sh
#
# Writes into $OUT (at most 8 files come back from there): env.txt, pgd.json, pgd.txt,
# eval.json, eval.txt.
set -u
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/gpu}
QUICK=${QUICK:-0}
# wall-clock limits (s): the whole script must end inside the run's timeout_s (420)
TOTAL_LIMIT=${TOTAL_LIMIT:-400}
PGD_LIMIT=${PGD_LIMIT:-60}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:src
else
    echo "no wheels in .whl/: torchattacks/ART rows will be skipped unless installed"
    export PYTHONPATH=src
fi

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv 2>/dev/null || echo "nvidia-smi: not available"
    lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)"
    cat /proc/loadavg
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
for m in ("numpy", "scipy", "sklearn", "tqdm", "torchattacks", "art", "modelshield"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(m, "NOT IMPORTABLE:", type(exc).__name__, exc)
EOF
} 2>&1 | tee "$OUT/env.txt"

if [ "$QUICK" = 1 ]; then  # dry run: every row and path, in a minute or two on a CPU
    pgd_sizes=(--batch 32 --repeats 3 --warmup 1 --threads 1)
    eval_sizes=(--n 40 --eps 0.2 --threads 1 --rounds 2)
else
    pgd_sizes=(--batch 512 --repeats 21 --warmup 3)
    eval_sizes=(--n 500 --rounds 3)
fi

echo "== PGD speed (evasion.py), $DEVICE"
timeout "$PGD_LIMIT" "$PY" benchmarks/evasion.py --device "$DEVICE" --model cnn \
    --input 3x32x32 --steps 10 "${pgd_sizes[@]}" --json "$OUT/pgd.json" 2>&1 | tee "$OUT/pgd.txt"
echo "evasion.py exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"

left() { echo $(( TOTAL_LIMIT - ($(date +%s) - start) )); }
echo "== AutoAttack evaluation (evaluation.py), $DEVICE, ART default list, $(left) s left"
timeout "$(left)" "$PY" benchmarks/evaluation.py --device "$DEVICE" "${eval_sizes[@]}" \
    --json "$OUT/eval.json" 2>&1 | tee "$OUT/eval.txt"
rc=${PIPESTATUS[0]}
echo "evaluation.py exit $rc after $(( $(date +%s) - start )) s"
if [ "$rc" = 124 ]; then
    # cut short: eval.json holds the rows finished before the cut (it is written after each
    # row), and eval.txt the start time of the row in flight, a lower bound on its time
    echo "evaluation.py was cut at the time limit; see the last 'starting' line above"
fi
cat /proc/loadavg
