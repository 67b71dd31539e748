#!/usr/bin/env bash
# Prepare what the device run carries (bench/gpu_run.sh): MLX's CUDA wheels for Python 3.12, split
# so that each device call carries under 64 MiB, mlx-lm and gguf, and SmolLM2's tokenizer and config.
# Run here, with network; writes only the ignored folder .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MLX=${MLX_VERSION:-0.32.4}
MLX_LM=${MLX_LM_VERSION:-0.32.2}
GGUF=${GGUF_VERSION:-0.19.0}
LIKE=${LIKE:-$HOME/.cache/mlx-lora/bench/smollm2-135m-float32}
rm -rf .gpu/wheels .gpu/part1 .gpu/part2
mkdir -p .gpu/wheels .gpu/part1 .gpu/part2/like
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .gpu/wheels "mlx==$MLX" "mlx-cuda-13==$MLX"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels "mlx-lm==$MLX_LM" "gguf==$GGUF"
cuda=$(ls .gpu/wheels/mlx_cuda_13-*.whl)
name=$(basename "$cuda")
split -b 44M -a 2 "$cuda" .gpu/wheels/cuda.part-
mv .gpu/wheels/cuda.part-aa .gpu/part1/
mv .gpu/wheels/cuda.part-* .gpu/part2/
(cd .gpu/wheels && sha256sum "$name") > .gpu/part2/SHA256SUMS
echo "$name" > .gpu/part2/cuda-wheel-name
rm "$cuda"
mv .gpu/wheels/*.whl .gpu/part2/
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json generation_config.json; do
  [ -f "$LIKE/$f" ] && cp "$LIKE/$f" .gpu/part2/like/
done
du -sh .gpu/part1 .gpu/part2
