"""scripts/setup.sh chooses torch: CUDA where nvidia-smi works, else the local CPU wheel where pip's configuration
reaches it offline, else PyTorch's CPU index (never a CUDA build on a CPU machine). Checked in plan mode
(QUEST_SETUP_PLAN=1: the choice and the commands are printed, nothing is installed) with stubbed commands on PATH and
pip's configuration replaced by environment variables."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def fake_torch_wheel(folder: Path, version: str = "2.13.0+cpu") -> None:
    """A minimal valid wheel named like the local CPU build (pip reads its metadata, nothing more)."""
    dist = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": "",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def plan(tmp_path: Path, nvidia_smi: int | None, wheel: bool, **env: str) -> str:
    """Run setup.sh in plan mode. nvidia_smi: None (absent) or the exit status of a stub; wheel: whether pip's
    (replaced) configuration has a find-links folder holding torch==2.13.0+cpu."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        stub = bin_dir / "nvidia-smi"
        stub.write_text(f"#!/bin/sh\nexit {nvidia_smi}\n")
        stub.chmod(0o755)
    links = tmp_path / "wheels"
    links.mkdir()
    if wheel:
        fake_torch_wheel(links)
    # Only the stubs and the one utility the script needs outside bash: no nvidia-smi or uv from this machine.
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    full_env = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,  # ignore the machine's pip configuration (its wheel folder)
        "PIP_FIND_LINKS": str(links),
        "PIP_NO_INDEX": "1",  # never the network
        "PYTHON": sys.executable,
        "QUEST_SETUP_PLAN": "1",
        **env,
    }
    out = subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts/setup.sh")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def installs(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("+ ") and " install " in line]


def test_gpu_machine_takes_the_cuda_build(tmp_path):
    out = plan(tmp_path, nvidia_smi=0, wheel=True)
    assert out.startswith("torch: CUDA build")
    assert installs(out)[-1].endswith("-m pip install -q -e .[dev,hf]")  # torch's CUDA build brings triton
    assert "cpu-constraints" not in out and CPU_INDEX not in out


def test_cpu_machine_with_the_local_wheel_pins_it(tmp_path):
    out = plan(tmp_path, nvidia_smi=None, wheel=True)
    assert out.startswith("torch: local CPU wheel torch==2.13.0+cpu")
    assert "echo 'torch==2.13.0+cpu' > .venv/.torch-pin.txt" in out
    assert "-c requirements/cpu-constraints.txt -c .venv/.torch-pin.txt -e .[dev,hf,triton]" in installs(out)[-1]
    assert CPU_INDEX not in out


@pytest.mark.parametrize("nvidia_smi", [None, 9])  # absent, or present with no working driver
def test_ordinary_cpu_machine_takes_pytorchs_cpu_index(tmp_path, nvidia_smi):
    out = plan(tmp_path, nvidia_smi=nvidia_smi, wheel=False)
    assert out.startswith(f"torch: CPU build from {CPU_INDEX}")
    steps = installs(out)
    # torch alone from the CPU index first (no other index can serve it), then the project with torch pinned to it
    assert steps[-2].endswith(f"install -q --index-url {CPU_INDEX} torch")
    assert "-c .venv/.torch-pin.txt" in steps[-1] and "torch" not in steps[-1].split("-e")[0].replace("torch-pin", "")


def test_uv_is_used_when_present_and_told_where_the_local_wheel_is(tmp_path):
    (tmp_path / "bin").mkdir()
    uv = tmp_path / "bin" / "uv"
    uv.write_text("#!/bin/sh\nexit 0\n")
    uv.chmod(0o755)
    (tmp_path / "bin" / "dirname").symlink_to(shutil.which("dirname"))
    (tmp_path / "t").mkdir()
    out = plan(tmp_path / "t", nvidia_smi=None, wheel=True, PATH=f"{tmp_path / 't' / 'bin'}:{tmp_path / 'bin'}")
    step = installs(out)[-1]
    assert step.startswith("+ uv pip install --python .venv/bin/python --find-links ")
    assert f"--find-links {tmp_path / 't' / 'wheels'} -c requirements/cpu-constraints.txt" in step


def test_forced_choice_and_bad_value(tmp_path):
    assert plan(tmp_path, nvidia_smi=0, wheel=True, QUEST_TORCH="cpu-index").startswith("torch: CPU build")
    env = {"PATH": "/usr/bin:/bin", "QUEST_TORCH": "rocm", "QUEST_SETUP_PLAN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "QUEST_TORCH=rocm: expected cuda, local or cpu-index" in out.stderr
