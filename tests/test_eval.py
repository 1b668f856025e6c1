"""Evaluate (quest_pl.evaluate) and generate (quest_pl.generate) on a tiny QAT checkpoint: evaluation reproduces the
training run's own validation, refuses another quantization unless asked, scores local text, writes metrics and
TensorBoard; generation is deterministic with a seed; the export command and loader work end to end."""

import json
import math

import pytest
import torch

from tests.conftest import compose, run_cli, scalars

TINY = ("experiment=smoke", "trainer.enable_progress_bar=false", "callbacks=none", "data.val_batches=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny QuEST W4A4 model trained 8 steps, with its run config beside the checkpoint as a Hydra run leaves it."""
    from omegaconf import OmegaConf

    from quest_pl.train import train

    run_dir = tmp_path_factory.mktemp("qat_run")
    cfg = compose(*TINY, "trainer.max_steps=8", "trainer.val_check_interval=8")
    metrics = train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, metrics


def evaluate(trained, tmp_path, *overrides):
    from quest_pl.evaluate import evaluate as evaluate_fn

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    cfg = compose(*TINY, f"eval.from={ckpt}", *overrides)
    return evaluate_fn(cfg, tmp_path, overrides=list(overrides))


def test_evaluate_reproduces_the_runs_validation(trained, tmp_path):
    _run_dir, train_metrics = trained
    metrics = evaluate(trained, tmp_path)
    # the same quantized model on the same validation batches as the run's final validation
    assert metrics["val/loss"] == pytest.approx(train_metrics["val/loss"], rel=1e-6)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-6)
    assert metrics["step"] == 8 and metrics["quant"] == "quest_w4a4"
    assert json.loads((tmp_path / "metrics.json").read_text())["val/loss"] == metrics["val/loss"]
    assert scalars(tmp_path, "val/loss") == {8: pytest.approx(metrics["val/loss"], rel=1e-6)}


def test_evaluate_refuses_another_quantization(trained, tmp_path):
    from quest_pl.config import ConfigError

    with pytest.raises(ConfigError, match="quant='bf16': differs from the quantization the checkpoint was trained"):
        evaluate(trained, tmp_path, "quant=bf16")
    assert not (tmp_path / "metrics.json").exists()
    same = evaluate(trained, tmp_path / "same", "quant=quest_w4a4", "quant.kernel=torch")  # same computation: fine
    bf16 = evaluate(trained, tmp_path / "bf16", "quant=bf16", "eval.allow_quant_change=true")
    assert bf16["quant"] == "bf16" and bf16["val/loss"] != same["val/loss"]
    # quant.* keys without a quant= group change the checkpoint's own quantization, not the default (bf16) one
    from quest_pl.evaluate import evaluate as evaluate_fn

    def bare(out, *overrides):  # no experiment=smoke: the composed quant is the default bf16
        cfg = compose("trainer.enable_progress_bar=false", "callbacks=none", f"eval.from={ckpt}", *overrides)
        return evaluate_fn(cfg, tmp_path / out, overrides=list(overrides))

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    assert bare("kernel", "quant.kernel=torch")["val/loss"] == same["val/loss"]
    with pytest.raises(ConfigError, match=r"quant='quest_w4a4' with quant\.a_bits=8: differs from the quantization"):
        bare("a8", "quant.a_bits=8")
    a8 = bare("a8", "quant.a_bits=8", "eval.allow_quant_change=true")
    assert a8["quant"] == "quest_w4a4" and a8["val/loss"] not in (same["val/loss"], bf16["val/loss"])


def test_perplexity_on_a_text_file(trained, tmp_path):
    from tokenizers import Tokenizer

    from quest_pl.data.run import find_tokenizer
    from quest_pl.evaluate import text_file_loss
    from quest_pl.export import module_from_checkpoint

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 30)
    metrics = evaluate(trained, tmp_path / "run", f"eval.text_file={text}")
    tok = Tokenizer.from_file(str(find_tokenizer(trained[0] / "checkpoints" / "last.ckpt")))
    n_tokens = len(tok.encode(text.read_text()).ids) + 1  # + <|endoftext|>
    assert metrics["tokens"] == n_tokens - 1  # every token but the first predicted once
    # definition: mean cross-entropy of each next token given the previous (up to seq_len) tokens
    module, _ = module_from_checkpoint(trained[0] / "checkpoints" / "last.ckpt", kernel=None)
    loss, count = text_file_loss(module.model, tok, str(text), seq_len=64, batch_size=1)
    assert (loss, count) == (pytest.approx(metrics["val/loss"], rel=1e-6), metrics["tokens"])
    assert 0 < metrics["val/loss"] < math.log(2048) + 1


@pytest.mark.slow
def test_cli_eval_and_errors(trained, tmp_path):
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    out = run_cli(f"eval.from={ckpt}", "callbacks=none", f"hydra.run.dir={tmp_path}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "final val/loss=" in out.stdout and (tmp_path / "metrics.json").is_file()
    bad = run_cli(f"eval.from={ckpt}", "quant=bf16", f"hydra.run.dir={tmp_path / 'bad'}", timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: quant='bf16': differs")
    missing = run_cli(f"eval.from={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path / 'm'}", timeout=300)
    assert missing.returncode == 2 and "error: eval.from=" in missing.stderr and "no such file" in missing.stderr


def test_generate_is_deterministic_with_a_seed(trained):
    from quest_pl.generate import generate, load_for_generation

    model, tok = load_for_generation(trained[0] / "checkpoints" / "last.ckpt")
    prompt = tok.encode("ROMEO:").ids
    a = generate(model, prompt, 66, temperature=1.0, top_k=20, seed=3)  # longer than seq_len = 64: context cropped
    b = generate(model, prompt, 66, temperature=1.0, top_k=20, seed=3)
    c = generate(model, prompt, 8, temperature=1.0, top_k=20, seed=4)
    assert a == b and c != a[:8] and len(a) == 66
    greedy = generate(model, prompt, 5, temperature=0)
    idx = torch.tensor([prompt])
    with torch.no_grad():
        first = int(model(idx)[0, -1].argmax())
    assert greedy[0] == first
    top1 = generate(model, prompt, 5, temperature=1.0, top_k=1, seed=9)
    assert top1 == greedy  # top-k 1 is greedy whatever the seed
    assert generate(model, prompt, 5, temperature=1e-40, seed=9) == greedy  # logits / T overflows fp32: still greedy
    vocab = model.cfg.vocab_size  # top-k beyond the vocabulary samples from the whole vocabulary
    assert generate(model, prompt, 5, top_k=vocab + 1000, seed=9) == generate(model, prompt, 5, top_k=None, seed=9)


def test_export_command_and_generate_from_the_export(trained, tmp_path):
    from quest_pl.export import main
    from quest_pl.generate import generate, load_for_generation
    from quest_pl.saving import load_packed

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    assert main([str(ckpt), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()
    packed, _ = load_packed(tmp_path / "out")
    qat, tok = load_for_generation(ckpt)
    idx = torch.tensor([tok.encode("KING HENRY:").ids])
    with torch.no_grad():
        assert torch.equal(packed(idx), qat(idx))
    from_export, _ = load_for_generation(tmp_path / "out")
    assert generate(from_export, idx[0].tolist(), 10, seed=1) == generate(qat, idx[0].tolist(), 10, seed=1)


def test_export_command_hugging_face(trained, tmp_path):
    import transformers  # the [hf] extra: scripts/setup.sh installs it, so this never skips

    from quest_pl.export import main
    from quest_pl.saving import load_packed

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    assert main([str(ckpt), str(tmp_path / "out"), "--hf", str(tmp_path / "hf")]) == 0  # W4A4, quantizers kept
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    packed, _ = load_packed(tmp_path / "out")
    with torch.no_grad():
        want, got = packed(ids), hf(ids).logits
    assert ids.shape[1] > 1 and (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert main([str(ckpt), str(tmp_path / "out"), "--hf", str(tmp_path / "hf")]) == 0  # an earlier export: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    assert main([str(ckpt), str(tmp_path / "out3"), "--hf", str(mine)]) == 2  # anything else: refused, untouched
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "out3").exists()
    # the dense (fp32) export of a W4A4 model is refused before anything is written, packed export included
    assert main([str(ckpt), str(tmp_path / "out2"), "--hf", str(tmp_path / "hf2"), "--hf-dense"]) == 2
    assert not (tmp_path / "out2").exists() and not (tmp_path / "hf2").exists()
    args = [str(ckpt), str(tmp_path / "out2"), "--hf", str(tmp_path / "hf2"), "--hf-dense", "--hf-drop-act-quant"]
    assert main(args) == 0
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32)
    assert not hasattr(dense.config, "quantization_config")


def one_error_line(capsys, start):
    err = capsys.readouterr().err
    assert err.startswith(start) and len(err.strip().splitlines()) == 1, err
    return err


def test_export_checks_everything_before_writing(trained, tmp_path, capsys, monkeypatch):
    """--hf without transformers, a JSON file that is not a tokenizer, a tokenizer larger than the model's vocabulary:
    one error line, exit 2, and no output directory."""
    import sys

    from tokenizers import Tokenizer, models

    from quest_pl.export import main

    ckpt = str(trained[0] / "checkpoints" / "last.ckpt")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # the [hf] extra is not installed
        assert main([ckpt, str(out), "--hf", str(tmp_path / "hf")]) == 2
    one_error_line(capsys, "error: --hf: needs transformers")
    not_a_tokenizer = tmp_path / "tok.json"
    not_a_tokenizer.write_text('{"vocab": {"a": 1}}')
    assert main([ckpt, str(out), "--tokenizer", str(not_a_tokenizer)]) == 2
    one_error_line(capsys, f"error: --tokenizer={str(not_a_tokenizer)!r}: not a tokenizer.json")
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(5000)} | {"<|endoftext|>": 5000}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    assert main([ckpt, str(out), "--tokenizer", str(tmp_path / "big.json")]) == 2
    one_error_line(capsys, f"error: --tokenizer={str(tmp_path / 'big.json')!r}: vocabulary of 5001 tokens")
    assert not out.exists()


def test_export_into_an_unwritable_directory_is_one_line(trained, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from quest_pl import export

    ckpt = str(trained[0] / "checkpoints" / "last.ckpt")
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    with monkeypatch.context() as m:  # a read-only directory (root ignores mode bits: the check is what is tested)
        m.setattr(export.os, "access", lambda path, mode: False if str(path) == str(out) else real_access(path, mode))
        assert export.main([ckpt, str(out)]) == 2
    one_error_line(capsys, f"error: out_dir={str(out)!r}: {str(out)!r} is not writable")

    def refused(path, data):  # the filesystem refuses the write itself (read-only mount, full disk)
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(export, "atomic_write_bytes", refused)
        assert export.main([ckpt, str(out)]) == 2
    one_error_line(capsys, f"error: out_dir={str(out)!r}: cannot write the export (Read-only file system)")
    assert not any(out.iterdir())


def test_export_removes_what_a_killed_export_left(trained, tmp_path):
    from quest_pl.export import main

    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".tmp-model.safetensors.k1ll3d"
    stale.write_bytes(b"\0" * 100_000)
    (out / "notes.txt").write_text("mine")
    assert main([str(trained[0] / "checkpoints" / "last.ckpt"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]


def test_generate_from_a_damaged_export_is_one_line(trained, tmp_path, capsys):
    from quest_pl.export import main as export_main
    from quest_pl.generate import main as generate_main
    from quest_pl.saving import read_packed, serialize

    assert export_main([str(trained[0] / "checkpoints" / "last.ckpt"), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    model_file = tmp_path / "out" / "model.safetensors"
    good = model_file.read_bytes()
    args = [str(tmp_path / "out"), "--max-new-tokens", "2", "--device", "cpu"]
    model_file.write_bytes(good[: len(good) * 2 // 3])  # cut short
    assert generate_main(args) == 2
    one_error_line(capsys, "error: ")
    model_file.write_bytes(good)
    tensors, config = read_packed(tmp_path / "out")
    name = next(k for k in tensors if k.endswith(".scale"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))  # scales overwritten, digest rewritten to match
    model_file.write_bytes(serialize(tensors, config))
    assert generate_main(args) == 2
    assert "holds NaN or infinite values" in one_error_line(capsys, "error: ")
    model_file.write_bytes(good)
    (tmp_path / "out" / "tokenizer.json").write_text("{not json")
    assert generate_main(args) == 2
    assert "is not a readable tokenizer.json" in one_error_line(capsys, "error: checkpoint=")


def test_evaluate_on_another_data_config_uses_the_checkpoints_tokenizer(trained, tmp_path):
    from quest_pl.data.run import find_tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(400)))
    metrics = evaluate(trained, tmp_path / "run", "data=text_file", f"data.path={text}", "data.chunks_per_file=8")
    assert metrics["data"] == f"text_file:{text}" and 0 < metrics["val/loss"] < math.log(2048) + 1
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    own = trained[0] / "tokenizer.json"
    assert own.is_file()  # training keeps a copy of its tokenizer in the run directory ...
    assert find_tokenizer(ckpt) == own  # ... and it is the one used
    saved = own.read_bytes()
    own.unlink()
    try:  # without it: the token cache named by the run's config
        cached = find_tokenizer(ckpt)
        assert cached != own and cached.name == "tokenizer.json" and cached.read_bytes() == saved
    finally:
        own.write_bytes(saved)


def test_generate_command(trained, capsys):
    from quest_pl.generate import main

    ckpt = str(trained[0] / "checkpoints" / "last.ckpt")
    args = [ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "6", "--seed", "1", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert first.startswith("ROMEO:") and capsys.readouterr().out == first
    assert main([ckpt, "--temperature", "-1"]) == 2
    assert "error: --temperature=-1.0" in capsys.readouterr().err
    assert main([ckpt, "--temperature", "nan"]) == 2
    assert "error: --temperature=nan" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([ckpt, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("error: --device=cuda")


def test_export_and_generate_refuse_bad_paths_in_one_line(trained, tmp_path, capsys):
    from quest_pl.export import main as export_main
    from quest_pl.generate import main as generate_main

    ckpt = str(trained[0] / "checkpoints" / "last.ckpt")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out, none = str(tmp_path / "out"), str(tmp_path / "none.json")
    for args, message in [
        ([ckpt, str(a_file)], "error: out_dir="),
        ([ckpt, out, "--tokenizer", none], "error: --tokenizer="),
        ([ckpt, out, "--hf", str(a_file)], "error: --hf="),  # transformers only logs this
    ]:
        assert export_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before any work
    assert generate_main([ckpt, "--tokenizer", none, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --tokenizer=")


# -- the run's own data and tokenizer; what contradicts the checkpoint -------------------------------------------------
@pytest.fixture
def text_run(trained, tmp_path):
    """A copy of the trained run whose config says it trained on a local text file (data=text_file)."""
    import shutil

    from omegaconf import OmegaConf

    run = tmp_path / "text_run"
    shutil.copytree(trained[0], run)
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600)))
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.data.source, cfg.data.path, cfg.data.chunks_per_file = "text_file", str(text), 8
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run, text


def test_a_data_key_override_keeps_the_runs_data_config(text_run, tmp_path):
    """eval.from=CKPT data.val_batches=1 evaluates the run's own text (one batch of it), not the default corpus."""
    run, text = text_run
    from quest_pl.evaluate import evaluate as evaluate_fn

    ckpt = run / "checkpoints" / "last.ckpt"
    one = evaluate_fn(compose(*TINY, f"eval.from={ckpt}", "data.val_batches=1"), tmp_path / "a", ["data.val_batches=1"])
    assert one["data"] == f"text_file:{text}"


def test_the_runs_tokenizer_is_used_after_the_text_changed(text_run):
    """The run's text changed after training: the data is tokenized with <run dir>/tokenizer.json, not with a
    tokenizer trained again on the new text (for eval, ptq and probe alike: quest_pl.data.run)."""
    run, text = text_run
    from quest_pl.data.run import data_config
    from quest_pl.train import build_datamodule

    text.write_text("".join(f"Zebra {i} quartz vexing jumbled wizards.\n" for i in range(800)))
    ckpt = run / "checkpoints" / "last.ckpt"
    data_cfg = data_config(compose(*TINY), ckpt, "eval.from", [])
    dm = build_datamodule(data_cfg)
    dm.prepare_data()
    dm.setup("validate")
    assert dm.tokenizer_file.read_bytes() == (run / "tokenizer.json").read_bytes()


def test_a_model_key_that_contradicts_the_checkpoint_is_refused(trained, tmp_path):
    from quest_pl.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.n_layer=4: the checkpoint .* was trained with model\.n_layer=1"):
        evaluate(trained, tmp_path, "model.n_layer=4")
    with pytest.raises(ConfigError, match=r"model\.lr=0\.5: not used with eval\.from"):
        evaluate(trained, tmp_path, "model.lr=0.5")
    assert not (tmp_path / "metrics.json").exists()


def test_a_damaged_run_tokenizer_is_one_line_for_every_tool(text_run, tmp_path, capsys):
    from quest_pl import probe, ptq
    from quest_pl.config import ConfigError
    from quest_pl.generate import main as generate_main

    run, text = text_run
    (run / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')  # cut short
    ckpt = run / "checkpoints" / "last.ckpt"
    damaged = "is not a readable tokenizer.json"
    with pytest.raises(ConfigError, match=damaged):
        evaluate((run,), tmp_path / "e")
    with pytest.raises(ConfigError, match=damaged):
        evaluate((run,), tmp_path / "t", f"eval.text_file={text}")
    with pytest.raises(ConfigError, match=damaged):
        ptq.run(compose(*TINY, f"ptq.from={ckpt}"), tmp_path / "p")
    with pytest.raises(ConfigError, match=damaged):
        probe.run(compose(*TINY, f"probe.from={ckpt}", "probe.device=cpu"), tmp_path / "q")
    assert generate_main([str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint=") and damaged in err[0]
    assert not any((tmp_path / d).exists() for d in "etpq")


def test_eval_text_file_is_strict(trained, tmp_path):
    """A directory is no text, and invalid bytes are one line naming the file and the byte offset (data.encoding)."""
    from quest_pl.config import ConfigError

    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(ConfigError, match=r"eval\.text_file=.*dir\.txt'?: only directories match"):
        evaluate(trained, tmp_path / "d", f"eval.text_file={tmp_path / 'dir.txt'}")
    bad = tmp_path / "latin.txt"
    raw = b"To be, or not to be. " * 20 + b"caf\xe9.\n"
    bad.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(ConfigError, match=rf"eval\.text_file: {bad} is not valid utf-8 at byte {offset} "):
        evaluate(trained, tmp_path / "u", f"eval.text_file={bad}")
    latin = evaluate(trained, tmp_path / "l", f"eval.text_file={bad}", "data.encoding=latin-1")
    assert latin["tokens"] > 0


def test_cli_eval_contradicting_model_key_is_one_line(trained, tmp_path, monkeypatch, capsys):
    import logging

    from tests.test_errors import files_under, run_cli_inprocess

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:  # the job configures logging (run.log in the run directory it then removes): restore it for later tests
        code, _, err = run_cli_inprocess(monkeypatch, capsys, cwd, f"eval.from={ckpt}", "model.n_layer=4")
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
            handler.close()
        root.handlers[:], root.level = handlers, level
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: model.n_layer=4"), err
    assert files_under(cwd) == set()


def test_a_tokenizer_larger_than_the_model_is_refused(trained, tmp_path, capsys):
    """generate --tokenizer with more tokens than the checkpoint's embedding rows: one line, not an IndexError."""
    from tokenizers import Tokenizer, models

    from quest_pl.generate import main as generate_main

    big = tmp_path / "big.json"
    Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(3000)}, unk_token="w0")).save(str(big))
    ckpt = str(trained[0] / "checkpoints" / "last.ckpt")
    assert generate_main([ckpt, "--tokenizer", str(big), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 3000 tokens, more than the checkpoint's vocabulary (2048)" in err[0]
