"""Train a Llama with quantization-aware training: ``python run.py [group=option ...] [key=value ...]``.

The same as the installed ``quest-pl`` command; see :mod:`quest_pl.cli`.
"""

from quest_pl.cli import cli

if __name__ == "__main__":
    cli()
