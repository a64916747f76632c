#!/usr/bin/env bash
# One run on a lent GPU machine: install the carried wheels (.whl/, from ../shared/gpu/prepare-wheels.sh) and
# fastrft into /tmp/site, check correctness (the whole test suite on CUDA tensors, so the compiled kernels run at
# every tested shape, plus the real-shape CUDA tests), then time bench_loss. Everything lands under $OUT (at most
# 8 files come back); the short table comes last. From the repository root: OUT=/some/dir bash benchmarks/gpu_session.sh
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
# fastrft itself: through pip where the build tools are there, else copied as installed (kernels/ becomes
# fastrft/kernels) with the C++ diff compiled by hand.
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . 2>"$OUT/pip_fastrft.log"; then
    rm -rf "$site/fastrft" && cp -r fastrft "$site/fastrft" && cp -r kernels "$site/fastrft/kernels"
    include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    g++ -O3 -std=c++17 -shared -fPIC -pthread -I"$include" csrc/diff.cpp -o "$site/fastrft/_diff$suffix" \
        || echo "C++ diff not built: the Python twin is used" | tee -a "$OUT/pip_fastrft.log"
fi
export PYTHONPATH=$site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
# Run from tests/ so that the source tree (where kernels/ is not yet fastrft.kernels) is not on sys.path.
(cd tests && python3 -m pytest -q -p no:cacheprovider . 2>&1 | tee "$OUT/pytest.log" | tail -5)
python3 benchmarks/bench_loss.py > "$OUT/bench_loss.log" 2>&1 || echo "bench_loss failed: see bench_loss.log"
cp benchmarks/results/bench_loss_cuda.* "$OUT/" 2>/dev/null || true
cat "$OUT/gpu.txt"
grep -v '^{' "$OUT/bench_loss.log" | tail -40
