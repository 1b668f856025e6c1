"""The import contracts of pyproject.toml (``lint-imports``, ARCHITECTURE.md): the package keeps them, and a new upward
import breaks them, at module level or inside a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install .[dev])")


def lint_imports(tmp_path: Path, inject: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts on a copy of the package's sources, with ``inject`` (module path
    -> source) appended to the copy's modules."""
    shutil.copytree(ROOT / "quest_pl", tmp_path / "quest_pl", ignore=shutil.ignore_patterns("corpus", "experiments"))
    for rel, source in (inject or {}).items():
        with open(tmp_path / "quest_pl" / rel, "a") as f:
            f.write("\n" + source)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_package_keeps_its_contracts(tmp_path):
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        # the Lightning module importing the training script: a function-level import counts
        ("module.py", "def _late():\n    from quest_pl.train import train\n", "layers"),
        # the config layer importing a post-training tool
        ("config/checks.py", "from quest_pl import ptq\n", "layers"),
        # the library layer importing Lightning
        ("model.py", "import lightning\n", "library"),
        # two modules of one layer importing each other (sweep imports report)
        ("report.py", "def _late():\n    from quest_pl import sweep\n", "acyclic"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, source, contract):
    result = lint_imports(tmp_path, {module: source})
    assert result.returncode != 0
    broken = [line.split(":")[0] for line in result.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert contract in broken, result.stdout
