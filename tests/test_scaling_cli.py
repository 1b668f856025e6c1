"""``python -m quest_pl.scaling fit`` at its boundary: bad input is one ``error:`` line, exit 2, nothing written; a fit
that does not converge exits 1; a sweep directory is read job by job, the end of an ``experiment=scaling_law`` sweep
writes the study, and refitting the directory gives the same numbers."""

import json
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from quest_pl.scaling.__main__ import main
from quest_pl.scaling.data import read_job
from quest_pl.scaling.laws import make_law, predict
from quest_pl.scaling.study import check_settings, sweep_study

LAW = {"A": 8.0, "alpha": 0.07, "B": 90.0, "beta": 0.25, "E": 0.5}
EFF = {"bf16": 1.0, "quest_w4a4": 0.7, "quest_w2a2": 0.15}


def law_loss(precision, n, d, noise=0.0):
    names = list(EFF)
    law = make_law("quest", len(names), 0)
    theta = law.from_natural(LAW, {i: (EFF[p],) for i, p in enumerate(names)})
    return float(predict(law, theta, n, d, names.index(precision))) * float(np.exp(noise))


def write_csv(path, rows, header="precision,params,tokens,loss"):
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def good_rows(sizes=(3e7, 1e8, 3e8, 8e8), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for ratio in (25, 100):
            for p in EFF:
                rows.append((p, int(n), int(ratio * n), round(law_loss(p, n, ratio * n, rng.normal(0, 0.002)), 6)))
    return rows


def fit_cli(*args):
    """``python -m quest_pl.scaling fit ARGS`` as a user runs it: exit status and stderr."""
    proc = subprocess.run([sys.executable, "-m", "quest_pl.scaling", "fit", *map(str, args)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return proc.returncode, proc.stderr


def assert_one_line_error(code, err, status, *words):
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


BAD_CSV = {
    "missing column": ("precision,params,loss", [("bf16", 1e7, 3.0)], ["missing column tokens"]),
    "non-positive value": (None, [("bf16", 0, 1e9, 3.0)], ["params=0.0", "> 0"]),
    "negative loss": (None, [("bf16", 1e7, 1e9, -3.0)], ["loss=-3.0"]),
    "not a number": (None, [("bf16", "ten", 1e9, 3.0)], ["params='ten'"]),
    "unknown column": ("precision,params,tokens,loss,lr", [("bf16", 1e7, 1e9, 3.0, 1e-3)], ["unknown column 'lr'"]),
}


@pytest.mark.parametrize("case", list(BAD_CSV))
def test_bad_csv_one_line_exit_2(tmp_path, case, capsys):
    header, rows, words = BAD_CSV[case]
    path = write_csv(tmp_path / "runs.csv", good_rows() + rows if header is None else rows,
                     header or "precision,params,tokens,loss")  # fmt: skip
    out = tmp_path / "out"
    assert main(["fit", str(path), "--out", str(out)]) == 2
    assert_one_line_error(2, capsys.readouterr().err, 2, *words)
    assert not out.exists()


def test_bad_runs_one_line_exit_2(tmp_path, capsys):
    """A precision with one run, fewer runs than parameters, no reference precision, a sweep directory with no
    finished job, a path that does not exist: one line each, exit 2, nothing written."""
    out = tmp_path / "out"
    cases = {
        "one run": ([*good_rows(), ("quest_w3a3", 1e8, 1e10, 3.1)], ["'quest_w3a3' has one run"]),
        "too few": (good_rows()[:6], ["6 runs for 7 parameters"]),  # one size: each precision at 2 token counts
        "no reference": ([r for r in good_rows() if r[0] != "bf16"], ["no runs of the reference precision 'bf16'"]),
    }
    for name, (rows, words) in cases.items():
        path = write_csv(tmp_path / f"{name}.csv", rows)
        assert main(["fit", str(path), "--out", str(out)]) == 2, name
        assert_one_line_error(2, capsys.readouterr().err, 2, *words)
    sweep = tmp_path / "sweep"
    (sweep / "0_bf16_s0" / ".hydra").mkdir(parents=True)  # started, never finished
    assert main(["fit", str(sweep), "--out", str(out)]) == 2
    assert_one_line_error(2, capsys.readouterr().err, 2, "no finished job")
    assert main(["fit", str(tmp_path / "nowhere.csv"), "--out", str(out)]) == 2
    assert_one_line_error(2, capsys.readouterr().err, 2, "no such file or directory")
    assert not out.exists()


def test_flags_and_non_convergence_as_a_user_runs_them(tmp_path):
    path = write_csv(tmp_path / "runs.csv", good_rows())
    out = tmp_path / "out"
    assert_one_line_error(*fit_cli(path, "--out", out, "--law", "chinchilla"), 2, "invalid choice: 'chinchilla'")
    assert_one_line_error(*fit_cli(path), 2, "--out")
    code, err = fit_cli(path, "--out", out, "--maxiter", "1")  # one evaluation per polish cannot converge
    assert_one_line_error(code, err, 1, "did not converge")
    assert not out.exists()


# -- sweeps -----------------------------------------------------------------------------------------------------------
def fake_sweep(root, precisions=tuple(EFF), layers=(1, 2, 4, 8), label="CPU ladder (test)", skip=()):
    """A sweep directory as experiment=scaling_law leaves it: one job per (layers, precision) with the job's
    ``.hydra/config.yaml`` and ``metrics.json``; losses from the known law at 100 tokens per parameter."""
    from quest_pl.config import compose
    from quest_pl.config.budget import non_embedding_params
    from quest_pl.config.names import register_resolvers

    register_resolvers()
    num = 0
    for p in precisions:
        cfg = compose("experiment=scaling_law", f"quant={p}")
        cfg.scaling.pipeline_check = label
        for n_layer in layers:
            cfg.model.n_layer = n_layer
            job = root / f"{num}_{p}_tiny_l{n_layer}_s0"
            (job / ".hydra").mkdir(parents=True)
            OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
            params = non_embedding_params(cfg.model)
            step_tokens = cfg.data.batch_size * cfg.model.seq_len
            steps = int(100 * params // step_tokens)
            num += 1
            if (p, n_layer) in skip:
                continue
            loss = law_loss(p, params, steps * step_tokens)
            metrics = {"status": "ok", "val/loss": loss, "non_embedding_params": params, "step": steps}
            (job / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_read_job_reads_what_a_run_writes(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", precisions=("quest_w4a4",), layers=(2,))
    (job,) = sweep.iterdir()
    row = read_job(job)
    assert row["precision"] == "quest_w4a4" and row["params"] == 524928 and row["label"] == "CPU ladder (test)"
    assert row["tokens"] == row["params"] * 100 // 2048 * 2048
    assert row["bits"] == pytest.approx(4 + 16 / 128)  # 4-bit codes and a 16-bit scale per row of 128
    metrics = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps(metrics | {"status": "diverged"}))
    assert read_job(job) is None


def test_sweep_study_and_refit_give_the_same_numbers(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    settings = {"law": "quest", "bootstrap": 20, "seed": 0, "reference": "bf16", "tokens_per_param": None,
                "pipeline_check": "CPU ladder (test)"}  # fmt: skip
    sweep_study(sweep, settings)
    first = json.loads((sweep / "scaling.json").read_text())
    assert first["pipeline_check"] == "CPU ladder (test)" and first["n_runs"] == 12
    assert "Pipeline check" in (sweep / "scaling.md").read_text()
    for p, eff in EFF.items():
        assert first["eff"][p] == pytest.approx(eff, rel=1e-3)  # noiseless runs: the law itself
    refit = tmp_path / "refit"
    assert main(["fit", str(sweep), "--out", str(refit), "--bootstrap", "20"]) == 0
    second = json.loads((refit / "scaling.json").read_text())
    for key in ("params", "params_ci", "eff", "eff_ci", "objective", "frontier", "pipeline_check"):
        assert second[key] == first[key], key


def test_sweep_study_handles_too_few_sizes(tmp_path, capsys):
    """A precision that finished one size is left out with a note (the CLI refuses it); a sweep with too few runs
    for any fit still ends with scaling.md saying why."""
    settings = {"law": "quest", "bootstrap": 0, "seed": 0, "reference": "bf16", "tokens_per_param": None}
    skip = {("quest_w2a2", n) for n in (2, 4, 8)}
    sweep = fake_sweep(tmp_path / "partial", skip=skip)
    sweep_study(sweep, settings)
    summary = json.loads((sweep / "scaling.json").read_text())
    assert "quest_w2a2" not in summary["eff"] and any("quest_w2a2" in n for n in summary["notes"])
    assert main(["fit", str(sweep), "--out", str(tmp_path / "strict")]) == 2
    assert "'quest_w2a2' has one run" in capsys.readouterr().err
    tiny = fake_sweep(tmp_path / "tiny", layers=(1, 2), skip={("quest_w2a2", 2)})
    sweep_study(tiny, settings)
    assert not (tiny / "scaling.json").exists()
    text = (tiny / "scaling.md").read_text()
    assert "No fit" in text and "parameters" in text and "python -m quest_pl.scaling fit" in text


def test_scaling_settings_checked_at_launch():
    from quest_pl.config import ConfigError, compose
    from quest_pl.config.names import register_resolvers

    register_resolvers()
    cfg = compose("experiment=scaling_law")
    check_settings(cfg.scaling)
    for key, value, words in (("law", "chinchilla", "scaling.law='chinchilla'"), ("bootstrap", -1, "scaling.bootstrap"),
                              ("tokens_per_param", 0, "scaling.tokens_per_param")):  # fmt: skip
        bad = cfg.scaling.copy()
        bad[key] = value
        with pytest.raises(ConfigError, match=words):
            check_settings(bad)
    with pytest.raises(ConfigError, match="is a sweep"):
        check_settings(cfg.scaling, multirun=False)


@pytest.mark.parametrize("scale", [None, "gpu_ladder"])
def test_ladders_compose_and_validate(scale):
    """Every size of each ladder (with QuEST W4A4) and every precision (at the largest size) composes and passes the
    checks a job runs first; job directories are the ones the sweep's plan gives (so its report sees every job)."""
    from hydra.types import RunMode

    from quest_pl.config import compose, validate
    from quest_pl.config.names import register_resolvers
    from quest_pl.model import LlamaConfig
    from quest_pl.quant import QuantConfig

    register_resolvers()
    extra = [f"+scale={scale}"] if scale else []
    sweep = compose("experiment=scaling_law", *extra, return_hydra_config=True)
    assert sweep.hydra.mode == RunMode.MULTIRUN
    assert "sweep_job_dir" in OmegaConf.to_container(sweep.hydra.sweep)["subdir"]
    models = sweep.hydra.sweeper.params.model.split(",")
    quants = sweep.hydra.sweeper.params.quant.split(",")
    assert "bf16" in quants and len(models) >= 3
    expected = ["llama_30m", "llama_50m", "llama_100m", "llama_200m", "llama_430m", "llama_800m"]
    assert models == (expected if scale else ["tiny_l1", "tiny", "tiny_l3"])
    for model, quant in [(m, "quest_w4a4") for m in models] + [(models[-1], q) for q in quants]:
        cfg = compose("experiment=scaling_law", *extra, f"model={model}", f"quant={quant}")
        validate(cfg)
        m = cfg.model
        QuantConfig.from_cfg(cfg.quant, LlamaConfig(n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head))
        assert cfg.scale.tokens_per_param == (100 if scale else 0.5)
        assert cfg.callbacks == {}  # no diagnostics in a scaling study
