import os

import torch

# Triton's CPU interpreter must be switched on before any @triton.jit function is defined (kernels/ imports Triton
# lazily, on its first kernel call). Only without CUDA: on a GPU the kernels run compiled, and torch.compile tests
# cannot trace interpreted kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared by every test that trains: the tokenised embedded corpus is built once per session into a private cache.
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One intra-op thread, as run.py uses on CPU: the suite's tensors are small, and on a few shared cores OpenMP threads
# spin against each other and other processes (several times slower under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("token_cache")
    old = os.environ.get("QUEST_CACHE")
    os.environ["QUEST_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("QUEST_CACHE", None)
    else:
        os.environ["QUEST_CACHE"] = old


def compose(*overrides: str):
    """The config ``python run.py OVERRIDES`` would see (Hydra compose API)."""
    from quest_pl.config import compose as compose_config

    return compose_config(*overrides)


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in a subprocess, from the repository root."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw
    )


def scalars(run_dir, tag: str) -> dict[int, float]:
    """Step -> value of a TensorBoard scalar written under ``<run_dir>/tensorboard``."""
    from quest_pl.report import read_scalars

    return dict(read_scalars(run_dir)[tag])
