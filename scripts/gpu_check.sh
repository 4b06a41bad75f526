#!/usr/bin/env bash
# The GPU half of tilenet's GPU path (issue 26) in one command on a lent GPU machine:
# the gpu-marked tests (nvJPEG vs libjpeg-turbo, bf16 vs fp32, --decode gpu end to end) and
# scripts/bench_gpu.py. Results go to $OUT (the device tool's folder) or ./gpu_check_out.
#
# 1. Here, once (pip and a network): the wheels the GPU image lacks, for CPython 3.12 on
#    x86-64 manylinux, into .whl/ (about 37 MB; git ignores it through .git/info/exclude):
#        bash scripts/gpu_check.sh --wheels
# 2. There, through the device tool, carrying .whl (nothing else: the repo travels itself):
#        run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#    The wheels are installed with --no-deps under /tmp/site; tilenet runs from the tree.
#    The GPU image has torch, torchvision, tifffile, scipy, pillow, psutil, fsspec, pyyaml,
#    matplotlib, nvidia-ml-py (pynvml), pytest and pytest-xdist already (KINDS.md).
set -uo pipefail
cd "$(dirname "$0")/.."

# tilenet's imports on the `tilenet infer` path that the GPU image lacks, at the versions
# the CPU tests ran with; monai for the sliding-window comparison; tifffile pinned too.
WHEELS=(
  imagecodecs==2026.3.6 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
  google-crc32c==1.9.0 omegaconf==2.4.0 tifffile==2026.3.3 monai==1.6.1
)

if [[ "${1:-}" == "--wheels" ]]; then
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  du -sh .whl
  exit
fi

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD"
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'bf16', torch.cuda.is_bf16_supported())"
} 2>&1 | tee "$OUT/env.txt"

# -W default: a library warning is shown, not turned into a failure that hides the figures.
timeout 180 python3 -m pytest -p no:cacheprovider -n 0 -m gpu -W default -rA -s \
  tests/engine/test_decode_device.py tests/engine/test_decode.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 330 python3 scripts/bench_gpu.py --out "$OUT/bench_gpu.json" --work /tmp/bench_gpu \
  2>&1 | tee "$OUT/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc; results in $OUT"
exit $((tests_rc || bench_rc))
