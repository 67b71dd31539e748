"""``mlx-lora convert``: a thin click command over :func:`mlx_lora.converters.hf_to_mlx.convert`.

Heavy imports (MLX, mlx-lm, gguf) happen inside the command so ``--help`` is instant. Errors are
:class:`~mlx_lora.plumbing.errors.MlxLoraError` subclasses, which the main CLI prints in one line.
"""

from __future__ import annotations

import sys
import time

import click
import mlx.core as mx

from mlx_lora.converters.hf_to_mlx import convert as run


def _max_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def _folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@click.command("convert")
@click.argument("src")
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (must not exist, or be empty).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Dtype of float weights and quantization scales (default: as stored).",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize linear and embedding layers (MLX affine; a QLoRA base).")
@click.option(
    "--bits",
    type=click.Choice(["2", "3", "4", "5", "6", "8"]),
    default="4",
    show_default=True,
    help="Bits per weight with -q.",
)
@click.option(
    "--group-size",
    type=click.Choice(["32", "64", "128"]),
    default="64",
    show_default=True,
    help="Weights sharing one scale and bias with -q.",
)
@click.option(
    "--keep",
    multiple=True,
    metavar="PATTERN[=BITS]",
    help="With -q: leave matching layers in float (lm_head, embeddings, '*.down_proj', 're:REGEX'), "
    "or quantize them with BITS instead. Repeatable.",
)
@click.option(
    "--hf", is_flag=True, help="GGUF source: write a plain Hugging Face folder (dequantized; transformers loads it)."
)
@click.option(
    "--keep-quantized",
    is_flag=True,
    help="GGUF source: keep Q4_0/Q4_1/Q8_0 weights quantized as MLX affine "
    "(exact; other quant types are re-quantized).",
)
@click.option("--revision", default=None, help="Hub branch, tag or commit when SRC is a repo id.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."
)
def convert(src, out, dtype, quantize, bits, group_size, keep, hf, keep_quantized, revision, overwrite):
    """Convert SRC (Hugging Face folder or repo id, or a .gguf file) into an MLX model folder.

    \b
    mlx-lora convert HF_ID_OR_FOLDER --out models/m
    mlx-lora convert HF_ID_OR_FOLDER --out models/m-4bit -q --bits 4 --group-size 64
    mlx-lora convert model.gguf --out models/m [--keep-quantized | --hf]
    """

    start = time.perf_counter()
    path = run(
        src,
        out,
        dtype=dtype,
        quantize=quantize,
        bits=int(bits),
        group_size=int(group_size),
        keep=list(keep) or None,
        revision=revision,
        keep_quantized=keep_quantized,
        hf=hf,
        overwrite=overwrite,
    )
    seconds = time.perf_counter() - start
    click.echo(
        f"wrote {path} ({_folder_bytes(path) / 2**30:.2f} GiB) in {seconds:.1f} s; peak memory: "
        f"MLX {mx.get_peak_memory() / 2**30:.2f} GiB, process max RSS {_max_rss_bytes() / 2**30:.2f} GiB",
        err=True,
    )
