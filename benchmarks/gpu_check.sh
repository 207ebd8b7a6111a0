#!/usr/bin/env bash
# The project's one GPU check (shared/GPU.md): versions, tests with the interpreter off, the
# benchmarks at real sizes, and a markdown table of ratios, in under ~8 minutes on one H100/H200.
#   bash benchmarks/gpu_check.sh RESULTS_DIR
# Peers missing on the GPU machine (liger-kernel, cut-cross-entropy, pytorch-metric-learning,
# faiss) travel as wheels in .whl/ (see README "Benchmarks"); they are installed if present.
# On a CPU it still runs, at small sizes (SAGA_BENCH_SIZE=small), which is how it is tested here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/local}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

python3 - <<'PY' | tee "$OUT_DIR/versions.txt"
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
for mod in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "pytorch_metric_learning", "faiss"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception as exc:  # report, don't stop: the benchmark of that peer will say it is skipped
        print(mod, "MISSING:", type(exc).__name__, exc)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee -a "$OUT_DIR/versions.txt"

if python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=0 SAGA_BENCH_SIZE="${SAGA_BENCH_SIZE:-real}"
else
  export SAGA_BENCH_SIZE="${SAGA_BENCH_SIZE:-small}"
fi

echo "== tests (interpreter off on a GPU; gpu-marked tests included) =="
timeout 240 python3 -m pytest tests/ -q -p no:cacheprovider 2>&1 | tail -n 60 | tee "$OUT_DIR/tests.txt"

echo "== benchmarks ($SAGA_BENCH_SIZE sizes) =="
timeout 300 python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT_DIR/bench.json" --benchmark-min-rounds=5 --benchmark-max-time=1 | tail -n 40

echo "== ratios (saga vs each peer, same run) =="
python3 benchmarks/summarize.py "$OUT_DIR/bench.json" "$OUT_DIR/bench.md"
