"""``mlx-lora fuse`` and ``mlx-lora export {gguf,adapter,ollama,lmstudio}``.

Thin click commands: parse options, call one library function. Heavy imports happen inside
the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import click

from mlx_lora.converters.adapter_export import export_gguf_adapter, export_mlx_lm, export_peft
from mlx_lora.converters.fuse import fuse as run
from mlx_lora.converters.gguf_export import export_gguf
from mlx_lora.converters.packaging import export_lmstudio, export_ollama

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
_model = click.option(
    "--model",
    help="Base model: local HF/MLX folder, Hugging Face repo id or .gguf file "
    "(default: the adapter's base_model_name_or_path).",
)
_adapter = click.option(
    "--adapter",
    "--adapter-path",
    "adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder or run folder (PEFT or mlx-lm layout).",
)
_overwrite = click.option("--overwrite", is_flag=True, help="Replace an existing output.")


@click.command()
@_model
@click.option(
    "--adapter",
    "--adapter-path",
    "adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder or run folder (PEFT or mlx-lm layout).",
)
@click.option("--out", "--save-path", "out", required=True, type=click.Path(), help="Output folder (HF format).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Store every tensor in this dtype (default: the precision each had in the base model).",
)
@click.option(
    "--quantize",
    is_flag=True,
    help="Re-quantize the fused layers (MLX affine) and report the error this adds to the adapter's change.",
)
@click.option("--q-bits", type=int, help="Bits for --quantize (default: the base's, else 4).")
@click.option("--q-group-size", type=int, help="Group size for --quantize (default: the base's, else 64).")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Reload the folder and compare logits with the in-memory fused model.",
)
@_overwrite
def fuse(model, adapter, out, dtype, quantize, q_bits, q_group_size, verify, overwrite):
    """Merge an adapter into its base model and write an HF-format folder (safetensors + tokenizer)."""

    run(
        model,
        adapter,
        out,
        dtype=dtype,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        verify=verify,
        overwrite=overwrite,
        log=click.echo,
    )


@click.group()
def export():
    """Export a model (+ adapter) for llama.cpp, Ollama, LM Studio or Hugging Face PEFT."""


@export.command()
@_model
@_adapter
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .gguf file.")
@click.option(
    "--type",
    "type_name",
    type=click.Choice(GGUF_TYPES, case_sensitive=False),
    default="f16",
    show_default=True,
    help="Tensor type; K-quants need the llama-cpp extra.",
)
@click.option("--name", help="general.name stored in the file.")
@click.option("--pre-tokenizer", help="llama.cpp pre-tokenizer name, when it cannot be derived from tokenizer.json.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the file back and compare logits and tokenization with the in-memory fused model.",
)
@_overwrite
def gguf(model, adapter, out, type_name, name, pre_tokenizer, verify, overwrite):
    """Fuse (if --adapter) and write a GGUF file for llama.cpp."""

    export_gguf(
        model,
        adapter,
        out,
        type_name=type_name.lower(),
        verify=verify,
        overwrite=overwrite,
        name=name,
        pre_tokenizer=pre_tokenizer,
        log=click.echo,
    )


@export.command()
@click.option(
    "--adapter",
    "--adapter-path",
    "adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder or run folder.",
)
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["gguf", "peft", "mlx-lm"]),
    help="gguf: llama.cpp LoRA (llama-cli --lora); peft: Hugging Face PEFT folder; mlx-lm: "
    "mlx_lm.load(..., adapter_path=OUT) / mlx_lm.generate --adapter-path OUT.",
)
@click.option("--out", required=True, type=click.Path(), help="Output .gguf file, PEFT or mlx-lm folder.")
@click.option(
    "--model",
    help="Base model (for the architecture, mlx-lm adapters and --verify; default: the "
    "adapter's base_model_name_or_path).",
)
@click.option(
    "--type",
    "type_name",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f32",
    show_default=True,
    help="Tensor type of a GGUF adapter.",
)
@click.option("--base-model", help="base_model_name_or_path to record in a PEFT export (e.g. a hub id).")
@click.option("--name", help="general.name of a GGUF adapter.")
@click.option(
    "--verify/--no-verify",
    default=False,
    show_default=True,
    help="Load the base model and compare logits with the original adapter.",
)
@_overwrite
def adapter(adapter, fmt, out, model, type_name, base_model, name, verify, overwrite):
    """Export an adapter alone (GGUF LoRA or PEFT); DoRA adapters must be fused instead."""

    if fmt == "mlx-lm":
        export_mlx_lm(adapter, out, model=model, verify=verify, overwrite=overwrite, log=click.echo)
    elif fmt == "peft":
        export_peft(
            adapter, out, model=model, base_model=base_model, verify=verify, overwrite=overwrite, log=click.echo
        )
    else:
        export_gguf_adapter(
            adapter,
            out,
            model=model,
            type_name=type_name,
            verify=verify,
            overwrite=overwrite,
            name=name,
            log=click.echo,
        )


@export.command()
@_model
@_adapter
@click.option("--name", required=True, help="Ollama model name (e.g. my-model or my-model:q8).")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Folder for the GGUF file(s) and Modelfile (default ./NAME-ollama)."
)
@click.option(
    "--type", "type_name", type=click.Choice(GGUF_TYPES, case_sensitive=False), default="q8_0", show_default=True
)
@click.option(
    "--mode",
    type=click.Choice(["fused", "adapter"]),
    default="fused",
    show_default=True,
    help="fused: one GGUF with the adapter merged; adapter: base GGUF + GGUF LoRA on an ADAPTER line.",
)
@click.option("--create/--no-create", default=None, help="Run `ollama create` (default: when ollama is on PATH).")
@click.option("--system", help="SYSTEM prompt to put in the Modelfile.")
@click.option("--num-ctx", type=int, help="PARAMETER num_ctx (default: the model's context, at most 8192).")
@click.option("--verify/--no-verify", default=True, show_default=True)
@_overwrite
def ollama(model, adapter, name, out, type_name, mode, create, system, num_ctx, verify, overwrite):
    """Write GGUF + Modelfile and register the model with `ollama create`."""

    export_ollama(
        model,
        adapter,
        name,
        out_dir=out,
        type_name=type_name.lower(),
        mode=mode,
        create=create,
        system=system,
        num_ctx=num_ctx,
        verify=verify,
        overwrite=overwrite,
        log=click.echo,
    )


@export.command()
@_model
@_adapter
@click.option("--name", required=True, help="Model folder name under the publisher.")
@click.option("--publisher", default="mlx-lora", show_default=True)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    help="LM Studio models folder (default $LMSTUDIO_MODELS_DIR or ~/.lmstudio/models).",
)
@click.option(
    "--type", "type_name", type=click.Choice(GGUF_TYPES, case_sensitive=False), default="q8_0", show_default=True
)
@click.option("--verify/--no-verify", default=True, show_default=True)
@_overwrite
def lmstudio(model, adapter, name, publisher, models_dir, type_name, verify, overwrite):
    """Write the fused GGUF into LM Studio's models folder (PUBLISHER/NAME/NAME-TYPE.gguf)."""

    export_lmstudio(
        model,
        adapter,
        name,
        models_dir=models_dir,
        publisher=publisher,
        type_name=type_name.lower(),
        verify=verify,
        overwrite=overwrite,
        log=click.echo,
    )
