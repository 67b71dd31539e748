#!/usr/bin/env bash
# The device run of issue 18 in two calls of the device tool, plus a CPU dry mode (see bench/README.md).
#
#   bash bench/gpu_prepare.sh      # here, with network: wheels and tokenizer into .gpu/ (ignored)
#   bash bench/gpu_run.sh stage    # device call 1, carry [".gpu/part1"]: copies part 1 outside the tree
#   bash bench/gpu_run.sh run      # device call 2 at once (the machine stays warm ~30 s), carry
#                                  # [".gpu/part2"]: joins and checks the wheel, installs into
#                                  # /tmp/site, runs bench/gpu_run.py, results under $OUT
#   bash bench/gpu_run.sh dry      # here: the same steps on the CPU at tiny sizes (no install)
#
# GPU_BUDGET (seconds, default 480) bounds the measurements of `run`.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/tmp/mlx-lora-stage}
SITE=${SITE:-/tmp/site}
mode=${1:-}
case "$mode" in
  stage)
    mkdir -p "$STAGE"
    cp .gpu/part1/* "$STAGE"/
    ls -l "$STAGE"
    ;;
  run)
    t0=$(date +%s)
    cp .gpu/part2/* "$STAGE"/
    cd "$STAGE"
    wheel=$(cat cuda-wheel-name)
    cat cuda.part-* > "$wheel"
    sha256sum -c SHA256SUMS
    cd - >/dev/null
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STAGE"/*.whl
    export PYTHONPATH="$SITE:$PWD"
    echo "installed in $(( $(date +%s) - t0 )) s"
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, 'cuda', mx.cuda.is_available(), mx.default_device())"
    OUT=${OUT:-$(mktemp -d)}
    PYTHONUNBUFFERED=1 python3 bench/gpu_run.py --like .gpu/part2/like --out "$OUT" --work /tmp/gpu-run-work \
      --budget "${GPU_BUDGET:-480}"
    ;;
  dry)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    PY=${PYTHON:-python3}
    OUT=${OUT:-$(mktemp -d)}
    PYTHONUNBUFFERED=1 "$PY" bench/gpu_run.py --dry --out "$OUT" --budget "${GPU_BUDGET:-900}" ${LIKE:+--like "$LIKE"}
    ;;
  *)
    echo "usage: bash bench/gpu_run.sh stage|run|dry" >&2
    exit 2
    ;;
esac
