"""Bad input on the command line: exit 2, exactly one ``error:`` line naming the key, no traceback, and no file
created (no run directory, no cache entry). Driven through the CLI entry point in-process (the same code as
``python run.py``; a subprocess costs seconds each on two cores)."""

import os
import sys

import pytest
import torch

from tests.conftest import compose


def files_under(path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def run_cli_inprocess(monkeypatch, capsys, cwd, *args) -> tuple[int, str, str]:
    from quest_pl.cli import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["run.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.fixture
def inputs(tmp_path):
    """Files the bad inputs point at, outside the run's working directory."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "not_a_tokenizer.json").write_text('{"hello": 1}')
    (d / "garbage.json").write_bytes(b"\x00\x01 not json")
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").mkdir()  # a directory whose name looks like a file
    (d / "a_file").write_text("x")
    # a 400-token tokenizer, as a file and inside a data=bin directory
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(400)}, unk_token="w0"))
    big.save(str(d / "big_tokenizer.json"))
    (d / "bin").mkdir()
    big.save(str(d / "bin" / "tokenizer.json"))
    for split in ("train", "val"):
        (d / "bin" / f"{split}.bin").write_bytes(bytes(2 * 1000))
    return d


# (arguments, a substring the one error line must contain). {in} is the inputs directory.
BAD_INPUTS = [
    # keys and options that do not exist
    (["quant.bitz=4"], "did you mean quant.bits?"),
    (["+quant.bitz=4"], "+quant.bitz=4: unknown key"),
    (["trainer.max_step=10"], "did you mean trainer.max_steps?"),
    (["modle=tiny"], "did you mean model?"),
    (["scale=gpu_30m"], "+scale=gpu_30m"),
    (["model=llama_1b"], "model='llama_1b': unknown option"),
    (["+trainer.max_step=10"], "trainer.max_step: not an argument of lightning's Trainer; did you mean max_steps?"),
    (["trainer.fast_dev_run=true"], "append it with +trainer.fast_dev_run=true"),
    (["+seed=1"], "seed already exists"),
    (["logger=tensorbord"], "did you mean tensorboard?"),
    (["debug=fast"], "debug='fast': unknown option"),
    (["quant=[bf16"], "cannot parse the command line"),
    # optimizer
    (["optim.eps=0"], "optim.eps=0"),
    (["optim.eps=abc"], "optim.eps='abc'"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["optim.betas=0.9"], "optim.betas=0.9"),
    (["optim.init_div=0"], "optim.init_div=0"),
    (["optim.lr=nan"], "optim.lr=nan"),
    (["optim.lr=inf"], "optim.lr=inf"),
    (["optim.weight_decay=nan"], "optim.weight_decay=nan"),
    # trainer
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["trainer.gradient_clip_val=abc"], "trainer.gradient_clip_val='abc'"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu'"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.devices=abc"], "trainer.devices='abc'"),
    (["trainer.max_steps=10000000000"], "trainer.max_steps=10000000000"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc'"),
    (["trainer.precision=8"], "trainer.precision=8"),
    # seed, compile
    (["seed=-1"], "seed=-1"),
    (["seed=4294967296"], "seed=4294967296"),
    (["compile=no"], "compile='no'"),
    # data
    (["data.chunks_per_file=0"], "data.chunks_per_file=0"),
    (["data.chunks_per_file=-3"], "data.chunks_per_file=-3"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.num_workers=abc"], "data.num_workers='abc'"),
    (["model.vocab_size=300"], "model.vocab_size=300: smaller than the data's vocabulary (2048"),
    (["data.tokenizer_path={in}/not_a_tokenizer.json"], "not a tokenizers JSON file"),
    # the vocabulary from every source the data can take it from, against model.vocab_size
    (["model.vocab_size=300", "data.tokenizer={in}/big_tokenizer.json"], "smaller than the data's vocabulary (400"),
    (["model.vocab_size=300", "data=bin", "data.path={in}/bin"], "smaller than the data's vocabulary (400"),
    (["model.vocab_size=300", "data=bin", "data.path={in}/bin", "data.tokenizer={in}/big_tokenizer.json"], "(400"),
    (["data.tokenizer={in}/garbage.json"], "data.tokenizer="),
    (["data.tokenizer_path={in}/nonexistent.json"], "no such file"),
    (["data.source=text_file", "data.path={in}/corpus/a.txt"], "a directory, not a file"),
    (["data.source=text_file"], "data.path"),
    (["data.source=text_file", "data.path=/nonexistent/*.txt"], "no file matches"),
    # quantization
    (["quant.trust=abc"], "quant.trust='abc'"),
    (["quant.trust=-1"], "quant.trust=-1"),
    (["quant.clip_scale=abc"], "quant.clip_scale='abc'"),
    (["quant.bits=abc"], "quant.bits='abc'"),  # reached the run-name resolver: a 150-line traceback
    (["quant.bits=nan"], "quant.bits=nan"),  # was reported as quant.w_bits
    (["quant=bf16", "quant.bits=4"], "quant.grid is null"),
    (["quant.bits=null"], "both operands are in full precision"),
    (["quant.w_bits=abc"], "quant.w_bits='abc'"),
    (["quant.grid=nf4"], "quant.grid='nf4'"),
    (["quant.learned_init_steps=-1"], "quant.learned_init_steps=-1: expected an integer >= 0"),
    (["quant.learned_init_steps=10"], "quant.learned_init_steps=10: expected 0, as no quantized operand"),
    (["quant=bf16", "quant.learned_init_steps=40"], "quant.learned_init_steps=40: re-initialises learned scales"),
    # keys that act only with another (quest_pl.config.rules)
    (["quant=bf16", "quant.backward=sr"], "quant.backward='sr': needs a quantizer grid"),
    (["quant=bf16", "quant.group_size=32"], "quant.group_size=32: needs a quantizer grid"),
    (["grad_comm.marina_p=0.5"], "grad_comm.marina_p=0.5: acts only with a compressed gradient hook"),
    (["grad_comm.hook=correlated"], "grad_comm.hook='correlated': a DDP communication hook; needs trainer.strategy"),
    (["quant=lsq_w4a4", "quant.learned_init_steps=30"], "quant.learned_init_steps=30: expected fewer than"),
    (["quant=lsq_w4a4", "trainer.tokens=1e30"], "trainer.tokens=1e+30"),
    (["quant=lsq_w4a4", "quant.learned_init_steps=40", "compile=true"], "quant.learned_init_steps=40: expected 0 with"),
    (["quant=quest_w4a4", "model.d_model=192", "model.n_head=1"], "128"),
    (["ptq.from={in}/a_file", "ptq.bits=abc"], "ptq.bits='abc'"),
    (["ptq.from={in}/nonexistent.ckpt"], "ptq.from"),
    (["ptq.from={in}/a_file", "ptq.method=aqlm", "ptq.aqlm.lr=inf"], "ptq.aqlm.lr=inf: expected a finite number"),
    (["ptq.from={in}/a_file", "ptq.aqlm.finetune_lr=nan"], "ptq.aqlm.finetune_lr=nan"),
    # paths
    (["ckpt_path={in}/corpus"], "a directory, not a checkpoint file"),
    (["ckpt_path={in}/garbage.json"], "not a readable checkpoint"),
    (["hydra.run.dir={in}/a_file"], "hydra.run.dir="),
    (["resume.allow_changes=optim.lr"], "resume.allow_changes"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_creates_nothing(monkeypatch, capsys, tmp_path, inputs, token_cache, args, needle):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache_before = files_under(token_cache)
    inputs_before = files_under(inputs)
    code, out, err = run_cli_inprocess(
        monkeypatch, capsys, cwd, "experiment=smoke", *[a.format(**{"in": inputs}) for a in args]
    )
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.format(**{"in": inputs}) in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert files_under(cwd) == set()  # no outputs/<run>/<time> stub with an empty run.log
    assert files_under(token_cache) == cache_before
    assert files_under(inputs) == inputs_before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_without_cuda_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli_inprocess(monkeypatch, capsys, tmp_path, "experiment=smoke", "trainer=gpu")
    assert code == 2 and err.count("error:") == 1 and "no CUDA device" in err, err
    assert files_under(tmp_path) == set()


def test_wandb_missing_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    code, _, err = run_cli_inprocess(monkeypatch, capsys, tmp_path, "experiment=smoke", "logger=wandb")
    assert code == 2 and "pip install wandb" in err and err.count("\n") == 1, err


def test_every_sweep_arm_is_validated_before_anything_runs(monkeypatch, capsys, tmp_path):
    """The third arm is bad: the sweep must not start (no multirun directory) rather than fail an hour later."""
    code, _, err = run_cli_inprocess(monkeypatch, capsys, tmp_path, "-m", "experiment=smoke", "optim.lr=1e-3,2e-3,-1")
    assert code == 2 and "optim.lr=-1" in err and err.count("\n") == 1, err
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_hub_is_one_line_within_seconds(monkeypatch, capsys, tmp_path, env):
    import time

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    code, _, err = run_cli_inprocess(monkeypatch, capsys, tmp_path, "experiment=smoke", "data=c4")
    assert time.perf_counter() - start < 15  # 3 s connection timeout plus composing on two busy cores
    assert code == 2 and err.count("\n") == 1 and "data=text_file" in err, err
    assert files_under(tmp_path) == set()


def test_paths_expand_home(monkeypatch, tmp_path):
    from quest_pl.config import expand_paths, validate

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("hello world\n" * 100)
    # (quoted: Hydra's grammar takes no bare ~; from a shell it arrives expanded, from a YAML file it does not)
    cfg = compose("experiment=smoke", "data.source=text_file", "data.path='~/corpus.txt'", "ckpt_path='~/x.ckpt'")
    cfg = expand_paths(cfg)
    assert cfg.data.path == str(tmp_path / "corpus.txt") and cfg.ckpt_path == str(tmp_path / "x.ckpt")
    cfg.ckpt_path = None
    validate(cfg)


def test_report_on_malformed_metrics_is_one_line(capsys, tmp_path):
    from quest_pl.report import main

    job = tmp_path / "0_bf16"
    job.mkdir()
    (job / "metrics.json").write_text('{"val/loss": NaN, ')
    assert main([str(tmp_path), "--no-ptq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "metrics.json" in err, err
    assert os.listdir(tmp_path) == ["0_bf16"]
