"""What every CLI module shares: option help, dtype choice, and writing the command's output."""

from __future__ import annotations

import click

MODEL_HELP = "alias (see `mlxgate models list`), local HF-layout directory, .gguf file, or Hugging Face repo id"
DTYPES = click.Choice(["float32", "bfloat16", "float16"])


def emit(text: str, out: str | None) -> None:
    """Print ``text``, or write it to ``out`` atomically. Under mlx.launch only rank 0 does either."""
    from mlxgate import distributed

    if not distributed.is_main():
        return
    if out:
        from mlxgate.io import write_text

        write_text(out, text if text.endswith("\n") else text + "\n")
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text)
