#!/usr/bin/env bash
# probe on one CUDA GPU, in one call (about 5-8 minutes on an H100/H200):
#   1. a venv on top of the machine's own CUDA torch (torch is never pip-installed here), plus
#      triton if that torch came without it (the fused statistics, probe.capture.kernels),
#   2. CUDA parity: probe's per-layer mean/std/min/max against output_hidden_states of the same
#      forward, then every statistic (fused Triton kernel where installed) against float64
#      moments; then the fused kernel against its float64 torch reference (default blocks, bf16,
#      odd sizes, NaN/inf) and the fused path's states against the eager path's on a padded bf16
#      batch (counts, extremes, absmax location, histograms exact); small random Llama; exits 1 if off,
#   3. bench.py on a ~1B-parameter random-init Llama-shaped model in bf16 on cuda: plain forward,
#      output_hidden_states + torch stats, nnsight, probe (default stats), probe without the
#      cross-layer statistic, probe recording 1 forward in 25 (schedule=), probe with the fused
#      kernel off; seconds, x plain and extra peak GPU memory per cell.
#
# Usage, from anywhere:   bash benchmarks/gpu.sh [more bench.py options, e.g. --methods plain,probe]
# Environment knobs:
#   PYTHON=python3        interpreter that already has a CUDA torch
#   VENV=/tmp/probe-gpu-venv   venv to create (seeing $PYTHON's packages) or reuse
#   OUT=/tmp/probe-gpu-out     where the logs and the JSON go (an $OUT already set is used as is)
#   COMPARATORS=auto      auto: install benchmarks/requirements.txt from ./.whl (carried wheels) or the
#                         index if reachable, else skip them; 0: don't try (their rows say skipped)
#   SHAPES=4x256,8x512
#   METHODS=plain,hidden_states,nnsight,probe,probe_nocross,probe_every25,probe_eager (add tl_forward,tl_cache
#                         for TransformerLens; 8x2048 then caches ~64 GiB of attention)
#   DEPTH=none (or e.g. 8,16,32: adds ~1-2 min)   BENCH_BUDGET=420 (seconds for step 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/probe-gpu-venv}
OUT=${OUT:-/tmp/probe-gpu-out}
COMPARATORS=${COMPARATORS:-auto}
SHAPES=${SHAPES:-4x256,8x512}
METHODS=${METHODS:-plain,hidden_states,nnsight,probe,probe_nocross,probe_every25,probe_eager}
DEPTH=${DEPTH:-none}
BENCH_BUDGET=${BENCH_BUDGET:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
started=$SECONDS

banner() { printf '\n=== %s (t=%ss) ===\n' "$*" "$((SECONDS - started))"; }

banner "environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch' || { echo "=== FAILED: $PYTHON has no torch; set PYTHON= to one that does ==="; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
    # $PYTHON may itself be a venv (then --system-site-packages would not see its torch): the new
    # venv sees $PYTHON's site-packages through a .pth file, after its own, so pip counts the
    # CUDA torch as installed and never replaces it
    "$PYTHON" -m venv "$VENV"
    purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
        > "$purelib/_probe_gpu_parent.pth"
fi
PY="$VENV/bin/python"
"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"=== FAILED: torch {torch.__version__} sees no CUDA device ===")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

# probe itself, without touching torch; its deps (transformers, numpy, h5py, rich) must be there
if ! "$PY" -c 'import probe' 2>/dev/null; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
        echo "pip install -e . failed; importing probe from src/ instead"
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$PY" -c 'import probe, transformers, numpy, h5py, rich; print("probe", probe.__version__, "from", probe.__file__, "| transformers", transformers.__version__)' \
    || { echo "=== FAILED: probe or one of its dependencies does not import ==="; exit 1; }

# the fused statistics need triton; CUDA wheels of torch depend on a matching one, so this only
# installs when that torch came without it
if ! "$PY" -c 'import triton' 2>/dev/null; then
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --find-links .whl "triton>=3" || true
    else
        timeout 180 "$PY" -m pip install -q "triton>=3" || true
    fi
fi
"$PY" -c 'import triton; print("triton", triton.__version__)' \
    || echo "triton is not installed: the fused path is off and the parity step reports it as a failure"

# optional comparators (TransformerLens, nnsight); bench.py skips their rows when absent
if [ "$COMPARATORS" != 0 ] && ! "$PY" -c 'import transformer_lens, nnsight' 2>/dev/null; then
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --find-links .whl -r benchmarks/requirements.txt \
            || echo "comparators: install from .whl failed; their rows will be skipped"
    else
        timeout 120 "$PY" -m pip install -q --retries 0 --timeout 10 -r benchmarks/requirements.txt \
            || echo "comparators: not installable here (no index reachable?); their rows will be skipped"
    fi
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "a comparator replaced the CUDA torch"' \
        || { echo "=== FAILED: installing the comparators replaced torch; rerun with COMPARATORS=0 ==="; exit 1; }
fi

banner "CUDA parity: probe vs output_hidden_states, bf16, small random Llama"
if ! "$PY" benchmarks/bench.py --parity --arch llama-tiny --device cuda --dtype bfloat16 --shapes 4x128 \
        2>&1 | tee "$OUT/gpu_parity.txt"; then
    echo
    echo "=================== CUDA PARITY FAILED: see the errors above ==================="
    exit 1
fi
grep -q "PARITY OK" "$OUT/gpu_parity.txt" || { echo "=== CUDA PARITY FAILED: no PARITY OK line ==="; exit 1; }

banner "benchmark: ~1B Llama shape, bf16, cuda (budget ${BENCH_BUDGET}s)"
# the parent is interrupted at the budget; the JSON is written after every cell, so it survives
rc=0
timeout --signal=INT "$BENCH_BUDGET" "$PY" benchmarks/bench.py --arch llama --device cuda --dtype bfloat16 \
    --threads 8 --shapes "$SHAPES" --depth "$DEPTH" --pairs 16 --timeout 180 --methods "$METHODS" \
    --json "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.txt" || rc=$?
banner "done (bench exit $rc; results in $OUT/gpu_bench.txt and $OUT/gpu_bench.json)"
exit "$rc"
