#!/usr/bin/env bash
# The GPU check of bnfast's CUDA path, in one run (issue 14):
#   1. build and install bnfast (pip install --no-build-isolation .)
#   2. the GPU tests (tests/test_cuda.py on the device: GPU vs CPU results)
#   3. the GPU benchmark (benchmarks/bench_gpu.py, i.e. bnfast.bench.gpu, float32
#      and float64; `bnfast bench --gpu` runs the same)
# and everything they print and write goes to the folder given as argument:
#   check.log  every step's output        env.txt  GPU, driver, versions
#   summary.txt  one line per step        bench_gpu_<dtype>.md / .json
# Needs CuPy (cupy-cuda13x or -cuda12x), a CUDA device and the build tools
# (setuptools, Cython, numpy); PyTorch with CUDA adds the PyTorch column.
# Each step has a time limit, and all of them share a budget of BUDGET seconds
# (default 420): a step gets at most what is left, and one that would get under
# 20 s is skipped, so the run ends within 7 minutes whatever happens (expected
# on an H200: 3 to 4). Exit status: 0 if every step passed, 1 otherwise.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
out=$1
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1   # import the installed bnfast, never the source tree
log=$out/check.log
summary=$out/summary.txt
: >"$log"
: >"$summary"
start=$SECONDS
budget=${BUDGET:-420}
failed=0

say() {   # progress on the console and in the log
    printf '[%3ds] %s\n' $((SECONDS - start)) "$*" | tee -a "$log"
}

step() {   # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log, record
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        say "$name: SKIPPED (the time budget of ${budget}s is spent)"
        echo "$name: SKIPPED (out of time)" >>"$summary"
        failed=1
        return 124
    fi
    say "$name (limit ${limit}s)"
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        say "$name: ok"
        echo "$name: ok ($((SECONDS - start))s)" >>"$summary"
    else
        [ $rc -eq 124 ] && say "$name: TIMED OUT after ${limit}s" || say "$name: FAILED (exit $rc)"
        echo "$name: FAILED (exit $rc)" >>"$summary"
        failed=1
    fi
    return $rc
}

say "bnfast GPU check -> $out"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --verify -q HEAD || echo unknown)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not on the PATH"
    fi
    "$PY" - <<'PYEOF' 2>&1
import platform, numpy
print("python", platform.python_version(), "numpy", numpy.__version__)
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "driver", cupy.cuda.runtime.driverGetVersion(),
          "devices", cupy.cuda.runtime.getDeviceCount())
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print("device 0:", props["name"], "SMs", props["multiProcessorCount"])
except Exception as err:
    print("cupy: unusable:", err)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except Exception as err:
    print("torch: unusable:", err)
PYEOF
} >"$out/env.txt"
cat "$out/env.txt" | tee -a "$log"

if ! step "CuPy sees a GPU" 40 "$PY" -c "
import cupy
n = cupy.cuda.runtime.getDeviceCount()
assert n > 0, 'no CUDA device'
print(n, 'device(s)')"; then
    say "stopping: the GPU tests and the benchmark need CuPy and a CUDA device"
    exit 1
fi
step "install" 180 "$PY" -m pip install --no-build-isolation .
# the installed package must carry the CUDA sources (package data)
step "kernel sources installed" 20 "$PY" -c "
from bnfast.cuda import _source
missing = [n for n in (_source.HEADER, *_source.SOURCES.values())
           if not (_source.KERNEL_DIR / n).is_file()]
assert not missing, f'the installed bnfast lacks {missing} in {_source.KERNEL_DIR}: add the package-data line for bnfast.cuda (kernels/*.cu, kernels/*.cuh) to pyproject.toml'
print('kernel sources in', _source.KERNEL_DIR)"

# GPU tests: the device backend only (the emulator and NVRTC tests are CI's)
step "GPU tests" 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
    -k "not emulator"
counts=$(grep -E '^[0-9]+ (passed|failed|error)' "$log" | tail -1)
say "GPU tests: ${counts:-no pytest summary}"
echo "GPU tests: ${counts:-no pytest summary}" >>"$summary"

step "benchmark float32" 140 "$PY" benchmarks/bench_gpu.py --out "$out" --dtype float32
step "benchmark float64" 80 "$PY" benchmarks/bench_gpu.py --out "$out" --dtype float64 \
    --reps 7
for md in "$out"/bench_gpu_*.md; do
    [ -f "$md" ] && grep -m1 '^Targets:' "$md" | sed "s|^|$(basename "$md"): |" >>"$summary"
done

say "done in $((SECONDS - start))s; summary:"
tee -a "$log" <"$summary"
exit $failed
