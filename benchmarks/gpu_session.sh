#!/usr/bin/env bash
# One command on a lent GPU machine (at most 600 s): install the carried wheels (.whl/, from
# ../shared/gpu/prepare-wheels.sh) and fastrft into /tmp/site, then run the parts asked for, each under its own time
# limit, writing everything under $OUT, short tables last. From the repository root:
#   OUT=/some/dir bash benchmarks/gpu_session.sh             # tests on CUDA, bench_loss (issue 2), bench_step (issue 4)
#   OUT=/some/dir bash benchmarks/gpu_session.sh trl         # bench_vs_trl (issue 6)
#   OUT=/some/dir bash benchmarks/gpu_session.sh tests,loss,refine   # bench_refine on Qwen2.5-0.5B width (issue 17)
#   OUT=/some/dir bash benchmarks/gpu_session.sh tiles       # the loss kernels' tiles, timed (bench_loss)
# Each part's limit in seconds: TESTS_S (160), LOSS_S (200), REFINE_S (60), TILES_S (200). The device's copy of the tree has no
# .git: name the commit in the command (FASTRFT_COMMIT=$(git rev-parse --short HEAD), written out) so that the
# results carry it.
# "tests" runs the whole suite on CUDA tensors, so the compiled kernels run at every tested shape, plus the
# real-shape CUDA tests. The carry is 64 MB: bitsandbytes is 43 MB and pyarrow (for TRL's datasets) 55 MB, so the
# trl part needs a carry of its own, without bitsandbytes: liger-kernel cut-cross-entropy trl accelerate datasets
# dill multiprocess xxhash pyarrow (about 59 MB, measured 2026-11-25; pandas, 12 MB more, must already be there).
# Each benchmark writes its results as it goes, so a part stopped by its limit keeps what it measured.
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
compgen -G ".whl/*.whl" > /dev/null || { echo "no wheels in .whl/: run ../shared/gpu/prepare-wheels.sh first" >&2; exit 2; }
command -v nvidia-smi > /dev/null || { echo "no nvidia-smi: this script runs on a machine with an NVIDIA GPU" >&2; exit 2; }
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
# fastrft itself: through pip where the build tools are there, else copied as installed (kernels/ becomes
# fastrft/kernels) with the C++ diff compiled by hand.
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . 2>"$OUT/pip_fastrft.log"; then
    rm -rf "$site/fastrft" && cp -r fastrft "$site/fastrft" && cp -r kernels "$site/fastrft/kernels"
    include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    g++ -O3 -std=c++17 -shared -fPIC -pthread -I"$include" csrc/diff.cpp -o "$site/fastrft/_diff$suffix" \
        || { echo "C++ diff not built: the Python twin is used" | tee -a "$OUT/pip_fastrft.log";
             export FASTRFT_PURE_PYTHON_DIFF=1; }
fi
export PYTHONPATH=$site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
parts=${1:-tests,loss,step}
run_bench() {   # name, seconds, arguments...: its results straight into $OUT, never an earlier session's
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 "benchmarks/$name.py" "$@" --out "$OUT/${name}_cuda" > "$OUT/$name.log" 2>&1 \
        || echo "$name failed or ran out of time: see $name.log"
}
# Run from tests/ so that the source tree (where kernels/ is not yet fastrft.kernels) is not on sys.path. The files
# that exercise the compiled kernels go first; 8 workers where pytest-xdist is there (2 threads each), a per-test
# limit where pytest-timeout is (a hung test prints its stack); SIGINT at the part's limit makes pytest list what
# failed so far, and -v names every test as it ends, so a cut run still says what ran.
first="test_loss.py test_diff.py test_batch.py test_kernels_compile.py test_refiner.py test_dialogue.py test_lora.py"
test_files="$first $(cd tests && ls test_*.py | grep -v -x $(printf -- '-e %s ' $first))"
test_opts=()
python3 -c "import xdist" 2>/dev/null && test_opts+=(-n 8)
python3 -c "import pytest_timeout" 2>/dev/null && test_opts+=(--timeout 120)
[[ ,$parts, == *,tests,* ]] && { (cd tests && OMP_NUM_THREADS=2 timeout -s INT -k 30 "${TESTS_S:-160}" python3 -m pytest \
    -v -rfE --tb=short --durations=15 -p no:cacheprovider "${test_opts[@]}" $test_files > "$OUT/pytest.log" 2>&1
    status=$?; tail -5 "$OUT/pytest.log"; exit $status) || echo "tests failed or ran out of time: see pytest.log"; }
[[ ,$parts, == *,loss,* ]] && run_bench bench_loss "${LOSS_S:-200}"
[[ ,$parts, == *,refine,* ]] && run_bench bench_refine "${REFINE_S:-60}" --models qwen2.5-0.5b-width --lengths 128 \
    --edits 0,0.02,1 --repeat 3 --dtype float32
# Tiles of the loss's Triton kernels, timed against the shipped ones and CCE on one shape (each checked first);
# printed only (bench_loss_tiles.log), so that bench_loss_cuda.* keeps the shipped tiles' results.
tiles="64x256x64x8x3 128x128x64x8x3 64x128x64x8x4 64x128x128x8x2 64x128x64x8x3+128x256x64x8x8x3
    64x128x64x8x3+128x128x64x8x4x4"
[[ ,$parts, == *,tiles,* ]] && { timeout "${TILES_S:-200}" python3 benchmarks/bench_loss.py --no-write \
    --shapes 8192x4096x131072 --providers "cce,fastrft,fastrft_1sweep$(printf ',fastrft@%s' $tiles)" \
    > "$OUT/bench_loss_tiles.log" 2>&1 || echo "tiles failed or ran out of time: see bench_loss_tiles.log"; }
[[ ,$parts, == *,step,* ]] && run_bench bench_step 150
[[ ,$parts, == *,trl,* ]] && run_bench bench_vs_trl 540
cat "$OUT/gpu.txt"
for name in bench_loss bench_loss_tiles bench_refine bench_step bench_vs_trl; do
    [ -f "$OUT/$name.log" ] && { echo "== $name"; grep -v '^{' "$OUT/$name.log" | tail -30; }
done
exit 0
