#!/usr/bin/env bash
# One GPU session: the CUDA tests, then the GPU benchmarks (bench_gpu.py, bench_early_stop.py,
# bench_serve.py, bench_backends.py, bench_regions.py). STEPS picks some: STEPS="tests serve" bash benchmarks/gpu_check.sh.
# Logs and JSON go to $OUT (default /tmp/nsfw-guard-gpu). Wheels in .whl/ (what the machine
# lacks: diffusers, litserve and its dependencies) are installed to /tmp/site first; the package
# runs from src/.
set -uo pipefail
OUT=${OUT:-/tmp/nsfw-guard-gpu}
STEPS=${STEPS:-tests backends regions gpu early serve}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, timm; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
for step in $STEPS; do
    case $step in
    tests)
        timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
            "tests/test_denoising.py::test_the_estimate_on_the_gpu_reads_nothing_back" 2>&1 \
            | tee "$OUT/tests.log" ;;
    gpu)
        (cd benchmarks && timeout 150 python3 bench_gpu.py --output "$OUT/gpu.json" 2>&1 \
            | grep -v "kept in float32" | tee "$OUT/bench_gpu.log") ;;
    early)
        (cd benchmarks && timeout 150 python3 bench_early_stop.py --output "$OUT/early-stop.json" \
            2>&1 | grep -v "kept in float32" | tee "$OUT/bench_early_stop.log") ;;
    backends)
        (cd benchmarks && timeout 400 python3 bench_backends.py --batches 1 4 16 32 \
            --output "$OUT/backends.json" 2>&1 | tee "$OUT/bench_backends.log") ;;
    regions)
        (cd benchmarks && timeout 300 python3 bench_regions.py --device cuda \
            --output "$OUT/regions.json" 2>&1 | tee "$OUT/bench_regions.log") ;;
    serve)
        (cd benchmarks && timeout 300 python3 bench_serve.py --device cuda \
            --output "$OUT/serve.json" 2>&1 | tee "$OUT/bench_serve.log") ;;
    esac
done
