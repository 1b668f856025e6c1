"""The wheel as a user gets it: built from a copy of the repository, installed into a fresh venv, used from a
temporary directory (`quest-pl experiment=smoke` trains and writes its run dir there; `import quest_pl` quantizes a
user's model). Its only top-level name is quest_pl, so nothing installed shadows another distribution.

To stay fast and offline the fresh venv has no pip and no dependencies of its own: a .pth file makes this
interpreter's site-packages (torch, lightning, hydra, ...) visible, and the wheel is installed with --no-deps. The
editable install of the repository living there is not visible (its .pth hook is not processed from an added path)."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "*.egg-info",
    "outputs",
    "multirun",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".cache",
)

USER_CODE = """
import torch, quest_pl
from torch import nn
model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
quest_pl.quantize_(model, quest_pl.QuantConfig.quest(bits=4))
loss = nn.functional.cross_entropy(model(torch.randn(8, 128)), torch.randint(0, 10, (8,)))
loss.backward()
quantized = [n for n, m in model.named_modules() if isinstance(m, quest_pl.QuantLinear)]
assert quantized == ["0", "2"], quantized
assert all(model[i].weight.grad.abs().sum() > 0 for i in (0, 2))
print("QUANTIZED", quest_pl.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "quest-pl"
    shutil.copytree(ROOT, src, symlinks=True, ignore=IGNORE)
    dist = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (path,) = dist.glob("quest_pl-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_shared_deps.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))
    # pip is among the shared packages: it installs into the interpreter that runs it, the fresh venv.
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    return env


def test_wheel_holds_one_top_level_name_with_configs_and_corpus(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        recorded = [line.split(",")[0] for line in z.read(record).decode().splitlines() if line]
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = z.read(top_level[0]).decode().split() if top_level else []
        entry_points = z.read(record.replace("RECORD", "entry_points.txt")).decode()
    dist_info = record.split("/")[0]
    assert {path.split("/")[0] for path in recorded} == {"quest_pl", dist_info}
    assert declared in ([], ["quest_pl"])
    for module in ("quantizers/__init__.py", "estimators/__init__.py", "kernels/__init__.py", "cli.py"):
        assert f"quest_pl/{module}" in recorded
    assert "quest_pl/experiments/config.yaml" in recorded and "quest_pl/experiments/quant/quest_w4a4.yaml" in recorded
    assert "quest_pl/experiments/experiment/smoke.yaml" in recorded
    assert any(p.startswith("quest_pl/corpus/") and p.endswith(".jsonl.xz") for p in recorded)
    assert not any(p.startswith("quest_pl/tests/") for p in recorded)
    assert "quest-pl = quest_pl.cli:cli" in entry_points


@pytest.mark.slow
def test_wheel_resolves_on_cpu_without_triton_numpy_24_or_cuda_packages(wheel, tmp_path):
    """What `pip install quest-pl[hf]` installs into a fresh venv on a CPU machine that has the CPU build of torch
    (pinned, as scripts/setup.sh does): pip's own resolution (`--dry-run --report`, nothing downloaded but metadata).
    No triton (torch's CUDA builds bring their own; the [triton] extra is for the interpreter), no numpy >= 2.4
    (outside the tested range), no CUDA package, and transformers / compressed-tensors do not replace torch."""
    import torch

    pin = tmp_path / "torch-pin.txt"
    pin.write_text(f"torch=={torch.__version__}\n")
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "-c", str(pin), f"{wheel}[hf]"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    versions = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert versions["torch"] == torch.__version__
    assert "triton" not in versions
    major, minor = (int(p) for p in versions["numpy"].split(".")[:2])
    assert (major, minor) < (2, 4), versions["numpy"]
    assert not [name for name in versions if name.startswith(("nvidia-", "cuda-"))], sorted(versions)
    assert "transformers" in versions and "compressed-tensors" in versions


@pytest.mark.slow
def test_fresh_venv_trains_smoke_in_the_cwd_and_quantizes_a_users_model(venv, tmp_path):
    work = tmp_path / "somewhere"
    work.mkdir()
    python, cli = venv / "bin" / "python", venv / "bin" / "quest-pl"
    out = subprocess.run([python, "-c", USER_CODE], cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"QUANTIZED {venv}" in out.stdout  # the installed package, not the repository

    out = subprocess.run([cli, "experiment=smoke"], cwd=work, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics_file,) = work.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["step"] == 30 and metrics["val/loss"] > 0
    assert (metrics_file.parent / "checkpoints" / "last.ckpt").is_file()

    out = subprocess.run(
        [cli, "experiment=smoke", "quant.bits=9"], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error: quant.bits=9")
