#!/usr/bin/env bash
# One run on a lent GPU machine: install the carried wheels (.whl/, from ../shared/gpu/prepare-wheels.sh) and fastrft
# into /tmp/site, check correctness (the whole test suite on CUDA tensors, so the compiled kernels run at every
# tested shape, plus the real-shape CUDA tests), then time bench_loss (issue 2), bench_step (issue 4) and
# bench_vs_trl (issue 6), each under its own time limit so that the whole fits one 600 s command. Everything lands
# under $OUT; the short tables come last. From the repository root: OUT=/some/dir bash benchmarks/gpu_session.sh
# The carry is 64 MB: bitsandbytes is 43 MB and pyarrow (for TRL's datasets) 55 MB, so bench_vs_trl needs a
# carry of its own, without bitsandbytes: liger-kernel cut-cross-entropy trl accelerate datasets dill multiprocess
# xxhash pyarrow (about 59 MB, measured 2026-11-25; pandas, 12 MB more, must already be on the machine).
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
(cd tests && timeout 150 python3 -m pytest -q -p no:cacheprovider . 2>&1 | tee "$OUT/pytest.log" | tail -5)
run_bench() {   # name, seconds, arguments...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 "benchmarks/$name.py" "$@" > "$OUT/$name.log" 2>&1 || echo "$name failed or ran out of time: see $name.log"
    cp benchmarks/results/"$name"_cuda.* "$OUT/" 2>/dev/null || true
}
run_bench bench_loss 220
run_bench bench_step 100
if python3 -c "import trl" 2>/dev/null; then run_bench bench_vs_trl 100; else echo "trl not carried: bench_vs_trl skipped"; fi
cat "$OUT/gpu.txt"
for name in bench_loss bench_step bench_vs_trl; do
    [ -f "$OUT/$name.log" ] && { echo "== $name"; grep -v '^{' "$OUT/$name.log" | tail -30; }
done
