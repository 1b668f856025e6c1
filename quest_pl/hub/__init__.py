"""Where people use models: ``transformers`` (``transformers_quantizer``: ``from_pretrained`` of a converted model;
``llama``: the project's Llama as a ``LlamaForCausalLM``) and compressed-tensors checkpoints (``compressed``).

:func:`register_on_import` is what ``import quest_pl`` calls: it registers the ``quest_pl`` quantization method with
``transformers`` as soon as ``transformers.quantizers.auto`` is imported (at once when it already is), without importing
``transformers`` itself, so ``import quest_pl`` stays cheap and works without the ``[hf]`` extra.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from pathlib import Path

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from quest_pl.hub.transformers_quantizer import register

        register()
    except Exception as e:  # a transformers without this registration API: loading still works without quest_pl
        warnings.warn(
            f"quest_pl: could not register the quest_pl quantization method with this transformers ({e}); "
            "from_pretrained of a quest_pl model will not rebuild it (pip install 'quest-pl[hf]')",
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name: str):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _InstalledKernelsFirst(importlib.abc.MetaPathFinder):
    """In a checkout, the repository's top-level ``kernels/`` (installed as ``quest_pl.kernels``) would shadow the
    ``kernels`` distribution that ``transformers`` imports whenever the checkout's root is on ``sys.path``
    (``python -m`` from the root, pytest): find ``kernels`` in every other ``sys.path`` entry first."""

    def __init__(self, ours: Path):
        self.ours = ours

    def find_spec(self, fullname, path, target=None):
        if fullname != "kernels":
            return None
        for entry in sys.path:
            candidate = Path(entry or ".") / "kernels"
            if candidate.exists() and candidate.resolve() == self.ours:
                continue
            spec = importlib.machinery.PathFinder.find_spec(fullname, [entry], target)
            if spec is not None:
                return spec
        return None


def _guard_kernels_name() -> None:
    package = Path(__file__).resolve().parents[1]  # quest_pl
    ours = (package / "kernels").resolve()
    if ours == package.parent / "kernels" and not any(isinstance(f, _InstalledKernelsFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstalledKernelsFirst(ours))  # a checkout: quest_pl/kernels links to ../kernels


def register_on_import() -> None:
    """Register with ``transformers`` now if its quantizer registry is loaded, else when it is."""
    _guard_kernels_name()
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _PostImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
