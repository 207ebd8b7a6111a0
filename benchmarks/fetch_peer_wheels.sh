#!/usr/bin/env bash
# Download the peers (and the test runner's pytest-xdist) the GPU machine lacks (shared/GPU.md) as wheels into .whl/ (git-ignored), for
# Python 3.12 on manylinux x86_64; benchmarks/gpu_check.sh installs whatever is there (--no-deps).
#   bash benchmarks/fetch_peer_wheels.sh            (needs PyPI; run it where there is network)
# The GPU machine already has torch, triton, transformers, numpy, scipy, scikit-learn, pillow,
# safetensors, tqdm, pytest (hence packaging) and pytest-benchmark: these wheels' other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PEERS=(
  liger-kernel==0.8.5              # needs torch, triton
  cut-cross-entropy==25.1.1        # needs torch, triton
  pytorch-metric-learning==2.9.0   # needs numpy, scikit-learn, torch, tqdm
  faiss-cpu==1.15.1                # needs numpy, packaging
  trl==1.16.0                      # TRL's fused head (trl.kernels imports only torch, packaging, transformers)
  pytest-xdist==3.8.0 execnet==2.1.1  # not a peer: gpu_check.sh's tests compile their kernels on 8 workers
)
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PEERS[@]}"

ls -l "$DEST"/*.whl
total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
echo "total: $((total / 1024)) KiB in $(ls "$DEST"/*.whl | wc -l) wheels"
if (( total >= 40 * 1024 * 1024 )); then
  echo "ERROR: the wheels take $((total / 1048576)) MiB, over the 40 MiB the device machine's carry allows" >&2
  exit 1
fi
