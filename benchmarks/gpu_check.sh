#!/usr/bin/env bash
# The project's one GPU check (shared/GPU.md): versions, tests with the interpreter off, the
# benchmarks at real sizes, and a markdown table of ratios, in under ~8 minutes on one H100/H200.
#   bash benchmarks/gpu_check.sh RESULTS_DIR
# Peers missing on the GPU machine (liger-kernel, cut-cross-entropy, pytorch-metric-learning,
# faiss, trl) travel as wheels in .whl/ (benchmarks/fetch_peer_wheels.sh; .whl/ is git-ignored, so a
# device run must carry it); they are installed if present.
# On a CPU it still runs, at small sizes (SAGA_BENCH_SIZE=small), which is how it is tested here.
#
# Every stage runs under its own time cap (SIGINT first, so pytest still reports and pytest-benchmark
# still saves what finished; SIGKILL 20 s later) and a failing stage never stops the later ones.
# GPU caps in seconds (sum 515, + ~20 of set-up: about 9 minutes even when every stage runs to its cap):
#   tests 110 (kernel compilation, on up to 8 xdist workers), gpu_tests 45, bench_logprob 75 (saga,
#   saga_recompute, torch, cce; and TRL's fused head in TRL's call pattern, entropy read / differentiated,
#   frozen / trained head), bench_attention 30, bench_metric 50, bench_step 150 (the 8B model built once
#   on the GPU; phase A, phase C saga / full / plain, phase B batched / per pair), bench_logprob_liger 45
#   (mostly liger's torch.compile warm-up), bench_eval 10 (a CPU benchmark: on the GPU machine at its small
#   size, as a smoke run of faiss/pml; its real size is a CPU-machine target). On a machine with 2+ GPUs also
#   torchrun_smoke 90 (2 steps of the random tiny Qwen3-VL on 2 ranks, data parallel and --shard-llm).
# Override a cap with CAP_<stage>=seconds (e.g. CAP_tests=300); on a CPU every cap is 900 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/local}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

python3 - <<'PY' | tee "$OUT_DIR/versions.txt"
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
for mod in ("triton", "transformers", "trl", "liger_kernel", "cut_cross_entropy", "pytorch_metric_learning", "faiss"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception as exc:  # report, don't stop: the benchmark of that peer will say it is skipped
        print(mod, "MISSING:", type(exc).__name__, exc)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee -a "$OUT_DIR/versions.txt"

if python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ON_GPU=1
  export TRITON_INTERPRET=0 SAGA_BENCH_SIZE="${SAGA_BENCH_SIZE:-real}"
else
  ON_GPU=0
  export SAGA_BENCH_SIZE="${SAGA_BENCH_SIZE:-small}"
fi

declare -A GPU_CAP=([tests]=110 [gpu_tests]=45 [bench_logprob]=75 [bench_attention]=30 [bench_metric]=50
                    [bench_step]=150 [bench_logprob_liger]=45 [bench_eval]=10 [torchrun_smoke]=90)
cap() {  # cap STAGE -> seconds
  local override="CAP_$1"
  if [[ -n "${!override:-}" ]]; then echo "${!override}"
  elif (( ON_GPU )); then echo "${GPU_CAP[$1]:-60}"
  else echo 900; fi
}
: > "$OUT_DIR/stages.txt"
stage() {  # stage NAME LOG COMMAND...: run under NAME's cap, log everything, show the tail, record rc + time
  local name=$1 log=$2 limit start rc status
  shift 2
  limit=$(cap "$name")
  start=$SECONDS
  echo "== $name (cap ${limit}s) =="
  timeout -s INT -k 20 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  case $rc in
    0) status=ok ;;
    124|137) status="STOPPED at the ${limit}s cap (rc $rc)" ;;
    *) status="failed (rc $rc)" ;;
  esac
  printf '%-16s %-40s %4ss\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$OUT_DIR/stages.txt"
}

# Tests: everything that touches the kernels, the probe or a GPU; the CPU-only suites (data, prompts, trainer
# loop, supervisor, retrieval, experiments, the TRL trainers and the README, which need datasets / accelerate) are
# left to CI. Compiling the kernels' ~100+ specializations
# dominates on a fresh GPU machine, so the unmarked tests run on up to 8 pytest-xdist workers when it is
# importable (.whl/ brings it); the gpu-marked ones (8B shapes, big buffers) then run alone.
TEST_ARGS=(tests/ -q -p no:cacheprovider -rfEs --ignore-glob='tests/test_data*' --ignore-glob='tests/test_train*'
           --ignore-glob='tests/test_synthetic*' --ignore=tests/test_prompts.py
           --ignore=tests/test_retrieve.py --ignore=tests/test_evaluate.py --ignore=tests/test_experiments.py
           --ignore=tests/test_trl.py --ignore=tests/test_readme.py)
WORKERS=()
if python3 -c "import xdist" 2>/dev/null; then
  n=$(nproc); WORKERS=(-n "$(( n < 8 ? n : 8 ))")
fi
stage tests "$OUT_DIR/tests.log" python3 -m pytest "${TEST_ARGS[@]}" "${WORKERS[@]}" -m "not gpu"
stage gpu_tests "$OUT_DIR/gpu_tests.log" python3 -m pytest "${TEST_ARGS[@]}" -m gpu

# Multi-GPU: 2 ranks (nccl), 2 steps of the random tiny Qwen3-VL with GRPO on, data parallel then with the LLM's
# decoder layers sharded (FSDP2); each run prints the LLM memory of rank 0. On a CPU-only or 1-GPU machine it says
# so (the gloo tests of tests/test_distributed.py cover the same code on CPU ranks).
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if (( GPUS >= 2 )); then
  SMOKE=(--model tiny-random --device cuda --max-steps 2 --steps-per-epoch 2 --image-size 32 --classes-per-batch 4
         --images-per-class 2 --max-new-tokens 16 --no-eval-before --no-eval-every-epoch --no-progress --workers 0)
  stage torchrun_smoke "$OUT_DIR/torchrun_smoke.log" bash -c "
    python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m saga_train ${SMOKE[*]} \
      --run-dir '$OUT_DIR/torchrun-dp' &&
    python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m saga_train ${SMOKE[*]} --shard-llm \
      --run-dir '$OUT_DIR/torchrun-shard'"
else
  echo "== torchrun_smoke: this machine has $GPUS GPU(s); the 2-rank smoke step needs 2 (skipped) =="
  printf '%-16s %-40s %4ss\n' torchrun_smoke "skipped ($GPUS GPU)" 0 >> "$OUT_DIR/stages.txt"
fi

# Benchmarks: one pytest per stage (its own cap and JSON): STAGE:FILE[:-k EXPRESSION]. Liger's provider, whose
# torch.compile warm-up takes longest, has a stage of its own after the others; new bench files run at the end.
BENCHES=(bench_logprob:bench_logprob:"not liger" bench_attention:bench_attention bench_metric:bench_metric
         bench_step:bench_step bench_logprob_liger:bench_logprob:liger)
for f in benchmarks/bench_*.py; do
  b=$(basename "$f" .py)
  [[ " ${BENCHES[*]} " == *" $b:$b"* || $b == bench_eval ]] || BENCHES+=("$b:$b")
done
BENCHES+=(bench_eval:bench_eval)
for entry in "${BENCHES[@]}"; do
  IFS=: read -r name file select <<<"$entry"
  [[ -f "benchmarks/$file.py" ]] || continue
  size=$SAGA_BENCH_SIZE
  [[ $file == bench_eval && $ON_GPU == 1 ]] && size=small
  rm -f "$OUT_DIR/$name.json"
  stage "$name" "$OUT_DIR/$name.log" env SAGA_BENCH_SIZE="$size" python3 -m pytest "benchmarks/$file.py" \
    ${select:+-k "$select"} --benchmark-only -q -p no:cacheprovider -rfEs --benchmark-json="$OUT_DIR/$name.json"
done

echo "== stages (total $((SECONDS - T0))s) =="
cat "$OUT_DIR/stages.txt"
echo "== ratios (saga vs each peer, same run; $SAGA_BENCH_SIZE sizes) =="
shopt -s nullglob
jsons=("$OUT_DIR"/bench_*.json)
python3 benchmarks/summarize.py --out "$OUT_DIR/bench.md" --merged "$OUT_DIR/bench.json" "${jsons[@]}"
