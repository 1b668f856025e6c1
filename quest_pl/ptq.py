"""Data-free post-training quantization (PTQ) of a trained checkpoint, HIGGS-style: QAT against PTQ at equal bits.

Every linear that QAT would quantize (those inside the transformer blocks, :func:`quest_pl.quant.quantize_model`) gets
its weight replaced, once and without data, by ``Q(W H)``: the block-128 Hadamard H along ``in_features`` (optional),
then any ``quantizers`` grid with per-row scales, or per group of ``g`` elements along the row (``g`` a multiple of
128). At inference the input is rotated the same way, ``y = Qa(x H) Q(W H)^T``: QuantLinear's half form
(METHOD.md §1.8), with the activation quantizer ``Qa`` optional (W4A16 or W4A4). Embeddings, ``lm_head`` and norms
stay as trained.

Command line (``experiments/config.yaml``, group ``ptq``)::

    python run.py ptq.from=outputs/bf16/<time>/checkpoints/last.ckpt ptq.grid=gaussian_mse ptq.bits=4 \
        ptq.hadamard=true [ptq.act_bits=4] [ptq.group_size=128]

evaluates on the validation split of the run that wrote the checkpoint (its ``.hydra/config.yaml``; else the composed
``data`` group), logs ``val/loss`` and ``val/ppl`` to TensorBoard at the checkpoint's step and writes ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from quest_pl import quantizers
from quest_pl.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PTQConfig:
    """What PTQ does to every block linear: weight grid and bits, Hadamard, scale granularity, activations."""

    grid: str = "gaussian_mse"
    bits: float = 4
    hadamard: bool = True
    group_size: int | None = None  # None: one scale per row; g: one per g consecutive elements of a row
    act_bits: float | None = None  # None: activations in full precision (WxA16)
    act_grid: str | None = None  # None: the weight grid

    @property
    def name(self) -> str:
        """``ptq_<grid>[_nohad][_g<g>]_w<b>a<b>``, e.g. ``ptq_gaussian_mse_w4a16``."""
        parts = ["ptq", self.grid] + ([] if self.hadamard else ["nohad"])
        parts += [f"g{self.group_size}"] if self.group_size else []
        a = "16" if self.act_bits is None else f"{float(self.act_bits):g}"
        return "_".join(parts) + f"_w{float(self.bits):g}a{a}"

    @classmethod
    def from_cfg(cls, p) -> PTQConfig:
        """From the ``ptq`` config group, with one-line errors naming the ``ptq.*`` key."""
        if not isinstance(p.get("hadamard", True), bool):
            raise ConfigError(f"ptq.hadamard={p.get('hadamard')!r}: expected true or false")
        g = p.get("group_size")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1 or g % quantizers.HADAMARD_BLOCK):
            raise ConfigError(
                f"ptq.group_size={g!r}: expected null (per row) or a multiple of {quantizers.HADAMARD_BLOCK}"
            )
        cfg = cls(
            grid=p.get("grid"),
            bits=p.get("bits"),
            hadamard=p.get("hadamard", True),
            group_size=g,
            act_bits=p.get("act_bits"),
            act_grid=p.get("act_grid"),
        )
        cfg.build_quantizers()
        return cfg

    def build_quantizers(self) -> tuple[nn.Module, nn.Module | None]:
        """The weight grid and the activation grid (or None), as ``quantizers.build`` gives them."""
        out = []
        for key, grid, bits in (("", self.grid, self.bits), ("act_", self.act_grid or self.grid, self.act_bits)):
            if key and bits is None:
                out.append(None)
                continue
            if grid not in quantizers.GRIDS:
                raise ConfigError(
                    f"ptq.{key}grid={grid!r}: unknown grid; available: {', '.join(sorted(quantizers.GRIDS))}"
                )
            try:
                out.append(quantizers.build(grid, bits=bits))
            except ValueError as e:
                raise ConfigError(f"ptq.{key}bits={bits!r} with grid {grid!r}: {e}") from None
        return out[0], out[1]


def quantize_weight(weight: torch.Tensor, grid: nn.Module, hadamard: bool, group_size: int | None) -> torch.Tensor:
    """``Q(W H)`` (or ``Q(W)``), per row or per group of ``group_size`` along the row, in the weight's dtype."""
    w = quantizers.hadamard_transform(weight) if hadamard else weight
    if group_size is None:
        return grid(w)
    rows, cols = w.shape
    return grid(w.reshape(rows, cols // group_size, group_size)).reshape(rows, cols)


class PTQLinear(nn.Module):
    """A linear layer with frozen quantized weights in the (optionally) rotated basis: ``y = Qa(x H) W_q^T``."""

    def __init__(self, weight_q: torch.Tensor, bias: torch.Tensor | None, hadamard: bool, act_quant: nn.Module | None):
        super().__init__()
        self.weight = nn.Parameter(weight_q, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.hadamard = hadamard
        self.act_quant = act_quant

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, hadamard={self.hadamard}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = quantizers.hadamard_transform(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def quantize_model_ptq(model: nn.Module, cfg: PTQConfig) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` inside ``model.blocks`` by a :class:`PTQLinear` holding ``Q(W H)``."""
    grid, act_grid = cfg.build_quantizers()
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            cols = module.in_features
            if cfg.hadamard and cols % quantizers.HADAMARD_BLOCK:
                raise ConfigError(
                    f"ptq.hadamard=true: {name} has in_features = {cols}, not a multiple of {quantizers.HADAMARD_BLOCK}"
                )
            if cfg.group_size and cols % cfg.group_size:
                raise ConfigError(f"ptq.group_size={cfg.group_size}: does not divide {name}'s in_features = {cols}")
            weight_q = quantize_weight(module.weight.detach(), grid, cfg.hadamard, cfg.group_size)
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], PTQLinear(weight_q, module.bias, cfg.hadamard, act_grid))
    return model


# -- checkpoints ----------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, key: str = "ptq.from") -> dict:
    """A checkpoint this project wrote (an ``LMModule``'s), with one-line errors for a missing or foreign file."""
    from quest_pl.config import check_checkpoint

    try:
        ckpt = check_checkpoint(str(path))
    except ConfigError as e:
        raise ConfigError(str(e).replace("ckpt_path=", f"{key}=", 1)) from None
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("model"), dict) or not isinstance(hp.get("optim"), dict):
        raise ConfigError(f"{key}={str(path)!r}: not a QuEST-PL checkpoint (no model hyper-parameters)")
    return ckpt


def module_from_checkpoint(ckpt: dict, path: str | Path, key: str = "ptq.from"):
    """The full-precision ``LMModule`` of a checkpoint: latent weights only (LSQ/PACT scales of a QAT run dropped)."""
    from quest_pl.module import LMModule
    from quest_pl.quant import is_quantizer_param

    hp = ckpt["hyper_parameters"]
    q = hp.get("quant") or {}
    if q.get("grid") and q.get("hadamard") and q.get("hadamard_mode", "half") == "half" and q.get("a_bits") is None:
        raise ConfigError(
            f"{key}={str(path)!r}: a weight-only half-Hadamard QAT checkpoint (quant={q.get('name')}) computes "
            "x (W H)^T, not x W^T; its latent weights are no full-precision model to post-train-quantize"
        )
    try:
        module = LMModule(hp["model"], hp["optim"], quant=None, max_steps=hp.get("max_steps", 1))
    except TypeError as e:
        raise ConfigError(f"{key}={str(path)!r}: incompatible model hyper-parameters ({e})") from None
    state = {k: v for k, v in ckpt["state_dict"].items() if not is_quantizer_param(k)}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        what = (
            (missing and f"missing {missing[0]}")
            or (unexpected and f"unexpected {unexpected[0]}")
            or (f"{bad_shape[0]} has shape {tuple(state[bad_shape[0]].shape)}")
        )
        raise ConfigError(f"{key}={str(path)!r}: incompatible checkpoint ({what})")
    module.load_state_dict(state)
    return module


def run_config_of(ckpt_path: str | Path) -> DictConfig | None:
    """The composed config of the run that wrote ``<run dir>/checkpoints/x.ckpt`` (its ``.hydra/config.yaml``)."""
    path = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


# -- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(
    ckpt_path: str | Path,
    ptq: PTQConfig,
    data_cfg: DictConfig,
    run_dir: str | Path,
    accelerator: str = "auto",
    precision: str | None = None,
    tensorboard: bool = True,
) -> dict:
    """PTQ a checkpoint and evaluate it on the validation split of ``data_cfg`` (a config with ``data``,
    ``model.seq_len``, ``seed``, ``trainer``) exactly as training validates; returns and writes ``metrics.json``."""
    import lightning as L

    from quest_pl.train import build_datamodule, resolve_precision

    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, ckpt_path)
    model_hp = ckpt["hyper_parameters"]["model"]
    if data_cfg.model.seq_len != model_hp["seq_len"]:
        data_cfg = OmegaConf.merge(data_cfg, {"model": {"seq_len": model_hp["seq_len"]}})
    dm = build_datamodule(data_cfg)
    dm.prepare_data()
    dm.setup("validate")
    if dm.vocab_size > model_hp["vocab_size"]:
        raise ConfigError(
            f"ptq.from={str(ckpt_path)!r}: the checkpoint's vocabulary ({model_hp['vocab_size']}) is smaller than "
            f"data.vocab_size={dm.vocab_size}; evaluate with the data config the checkpoint was trained on"
        )
    quantize_model_ptq(module.model, ptq)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=resolve_precision(precision, accelerator),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    results = trainer.validate(module, datamodule=dm, verbose=False)[0]
    step = int(ckpt.get("global_step", 0))
    metrics = {
        "val/loss": float(results["val/loss"]),
        "val/ppl": float(results["val/ppl"]),
        "step": step,
        "wall_s": time.perf_counter() - start,
        "checkpoint": str(Path(ckpt_path).resolve()),
        "ptq": asdict(ptq),
    }
    if tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        logger.log_hyperparams({f"ptq.{k}": v for k, v in asdict(ptq).items()} | {"ptq.from": str(ckpt_path)})
        logger.log_metrics({"val/loss": metrics["val/loss"], "val/ppl": metrics["val/ppl"]}, step=step)
        logger.finalize("success")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """``python run.py ptq.from=CKPT ...``: PTQ evaluation of one checkpoint (see the module docstring)."""
    from quest_pl.config import validate

    ckpt_path = cfg.ptq["from"]
    ptq = PTQConfig.from_cfg(cfg.ptq)
    load_checkpoint(ckpt_path)  # fail early, before any data work
    data_cfg = run_config_of(ckpt_path)
    if data_cfg is None:
        log.info("no .hydra/config.yaml beside %s: evaluating on the composed data config", ckpt_path)
        validate(cfg)
        data_cfg = cfg
    else:
        log.info("evaluating on the validation split of the run that wrote %s", ckpt_path)
    t = cfg.trainer
    metrics = evaluate(
        ckpt_path, ptq, data_cfg, run_dir, accelerator=t.accelerator, precision=t.precision,
        tensorboard=bool((cfg.get("logger") or {}).get("tensorboard")),
    )  # fmt: skip
    return {**metrics, "rank": 0}


# -- sweeps ---------------------------------------------------------------------------------------------------------
def sweep_configs(rows: list[dict]) -> list[PTQConfig]:
    """PTQ settings matching a sweep's quantized arms: each (weight grid, bits) with the arm's activation quantization
    (WbAb) and weight-only (WbA16), all with the Hadamard rotation (HIGGS), per-row scales; in arm order."""
    configs = []
    for r in rows:
        q = r.get("_quant") or {}
        if r.get("method") != "QAT" or q.get("w_bits") is None:
            continue
        w_grid = q.get("w_grid") or q.get("grid")
        a_grid = q.get("a_grid") or q.get("grid")
        for act_bits in (q.get("a_bits"), None):
            c = PTQConfig(
                grid=w_grid,
                bits=q["w_bits"],
                hadamard=True,
                act_bits=act_bits,
                act_grid=None if act_bits is None or a_grid == w_grid else a_grid,
            )
            if c not in configs:
                configs.append(c)
    return configs


def sweep_rows(rows: list[dict], sweep_dir: str | Path) -> list[dict]:
    """Report rows (:mod:`quest_pl.report`) for PTQ of the sweep's BF16 arm at the quantized arms' grids and bits.
    Each evaluation is kept in ``<sweep dir>/ptq/<name>/`` (TensorBoard and metrics.json) and reused when the report
    is regenerated from the same checkpoint."""
    base = next((r for r in rows if r.get("method") == "BF16"), None)
    if base is None:
        return []
    ckpt_path = base["_job_dir"] / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        log.warning("no %s: PTQ rows skipped", ckpt_path)
        return []
    data_cfg = OmegaConf.load(base["_job_dir"] / ".hydra" / "config.yaml")
    out = []
    lightning_log = logging.getLogger("lightning.pytorch")  # no "GPU available" banner per evaluation
    level, lightning_log.level = lightning_log.level, logging.WARNING
    try:
        for ptq in sweep_configs(rows):
            out.append(_sweep_row(ptq, ckpt_path, data_cfg, Path(sweep_dir)))
    finally:
        lightning_log.setLevel(level)
    return out


def _sweep_row(ptq: PTQConfig, ckpt_path: Path, data_cfg: DictConfig, sweep_dir: Path) -> dict:
    run_dir = sweep_dir / "ptq" / ptq.name
    cached = run_dir / "metrics.json"
    metrics = json.loads(cached.read_text()) if cached.is_file() else None
    if not metrics or metrics.get("checkpoint") != str(ckpt_path.resolve()) or metrics.get("ptq") != asdict(ptq):
        log.info("PTQ %s of %s", ptq.name, ckpt_path)
        metrics = evaluate(
            ckpt_path,
            ptq,
            data_cfg,
            run_dir,
            accelerator=data_cfg.trainer.accelerator,
            precision=data_cfg.trainer.precision,
        )
    return ptq_row(ptq, metrics)


def ptq_row(ptq: PTQConfig, metrics: dict) -> dict:
    grid = ptq.grid if ptq.act_bits is None or not ptq.act_grid else f"{ptq.grid} / {ptq.act_grid}"
    a = "16" if ptq.act_bits is None else f"{float(ptq.act_bits):g}"
    return {
        "arm": ptq.name,
        "method": "PTQ",
        "grid": grid + (f" g{ptq.group_size}" if ptq.group_size else ""),
        "bits": f"W{float(ptq.bits):g}A{a}",
        "estimator": "-",
        "hadamard": "half" if ptq.hadamard else "no",
        "val_loss": metrics["val/loss"],
        "val_ppl": metrics["val/ppl"],
        "wall_s": metrics.get("wall_s"),
        "steps": metrics.get("step"),
    }
