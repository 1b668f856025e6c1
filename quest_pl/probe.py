"""Controlled alignment probe: the estimators compared on the same weights (the measurement behind the paper's Fig. 2;
METHOD.md §4.2).

Alignment logged during training compares each arm on its own trajectory. The probe loads ONE checkpoint and, for
each listed quantizer config, computes on the same N validation batches and the same latent weights theta:

* g_Q: the gradient of the mean loss over the N batches with that quantizer config applied to theta (its forward,
  its estimator's backward), in fp32 without autocast;
* g_FP: the gradient of the same loss with every quantizer and rotation bypassed
  (:func:`quest_pl.quant.full_precision`);

and reports, per quantized linear in depth order from the top, the whole-tensor cosine of the weight gradients and
the per-row cosines (mean +- std over output rows: the paper's format), plus the whole-model cosine and the masked
fractions of that forward. LSQ/PACT scales are initialised from the first probe batch (the checkpoint's own learned
scales belong to its own quantizer, not to the configs compared)::

    python run.py probe.from=<run dir>/checkpoints/last.ckpt probe.quant=[ste_w4a4,trust_w4a4,quest_w4a4]

Writes to the run directory: ``probe.csv`` (quant, layer, depth_from_top, cos, row_mean, row_std), ``probe.md`` (the
summary table) and ``probe_alignment.pdf/.png``. Validation batches are those of the run that wrote the checkpoint
(its ``.hydra/config.yaml``), else of the composed ``data`` config.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from quest_pl.config import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def check(cfg: DictConfig) -> tuple[str, list[str], int, str]:
    """``probe.*`` keys with one-line errors: (checkpoint, quant config names, batches, device)."""
    from quest_pl.config import CONFIG_DIR

    p = cfg.probe
    names = p.get("quant")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, ListConfig)) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"probe.quant={names!r}: expected a non-empty list of quant configs, e.g. [ste_w4a4,quest_w4a4]"
        )
    available = sorted(f.stem for f in (CONFIG_DIR / "quant").glob("*.yaml"))
    for name in names:
        if name not in available:
            raise ConfigError(f"probe.quant: {name!r} is not a quant config; available: {', '.join(available)}")
    batches = p.get("batches")
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ConfigError(f"probe.batches={batches!r}: expected an integer >= 1")
    device = p.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"probe.device={device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("probe.device=cuda: no CUDA device is available")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(p["from"]), list(names), batches, device


def quant_group(name: str) -> dict:
    """The ``quant`` group ``quant=<name>`` composes to (resolved). Read from ``experiments/quant/`` directly, with
    its defaults list (other files of the group, ``_self_``), because it runs inside ``hydra.main`` too."""
    from quest_pl.config import CONFIG_DIR

    def load(stem: str):
        node = OmegaConf.load(CONFIG_DIR / "quant" / f"{stem}.yaml")
        defaults = list(node.pop("defaults", None) or ["_self_"])
        if "_self_" not in defaults:
            defaults.append("_self_")
        merged = OmegaConf.create({})
        for entry in defaults:
            merged = OmegaConf.merge(merged, node if entry == "_self_" else load(str(entry)))
        return merged

    return OmegaConf.to_container(load(name), resolve=True)


def validation_batches(data_cfg: DictConfig, n: int, seq_len: int, vocab: int, key: str) -> list[tuple]:
    from quest_pl.train import build_datamodule

    if data_cfg.model.seq_len != seq_len:
        data_cfg = OmegaConf.merge(data_cfg, {"model": {"seq_len": seq_len}})
    dm = build_datamodule(data_cfg)
    dm.prepare_data()
    dm.setup("validate")
    if dm.vocab_size > vocab:
        raise ConfigError(
            f"{key}: the checkpoint's vocabulary ({vocab}) is smaller than data.vocab_size={dm.vocab_size}; "
            "probe with the data config the checkpoint was trained on"
        )
    out = []
    for batch in dm.val_dataloader():
        out.append(batch)
        if len(out) == n:
            break
    if len(out) < n:
        log.warning("only %d validation batches available (probe.batches=%d)", len(out), n)
    return out


def _gradients(model, batches, device, loss_fn) -> dict[str, torch.Tensor]:
    """Weight gradients of every QuantLinear-or-block linear for the mean loss over ``batches`` (fp32, no autocast)."""
    from quest_pl.callbacks.base import diagnosed_layers

    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, enabled=False):
        for inputs, targets in batches:
            (loss_fn(model(inputs.to(device)), targets.to(device)) / len(batches)).backward()
    return {n: layer.weight.grad.detach().clone() for n, layer in diagnosed_layers(model).items()}


def full_precision_key(model) -> tuple:
    """What the full-precision forward of ``model`` (:func:`quest_pl.quant.full_precision`) computes beyond the plain
    ``x W^T`` of every linear: the layers that stay rotated when bypassed (a weight-only or activation-only half-form
    layer is ``x (W H)^T``), with the operand and Hadamard block. Models with the same key have the same
    full-precision function of the same latent weights, hence the same full-precision gradient."""
    from quest_pl.quant import quant_layers

    return tuple(
        (name, "weight" if layer.act_quant is None else "act", layer.hadamard_block)
        for name, layer in quant_layers(model).items()
        if layer.hadamard == "half" and (layer.act_quant is None) != (layer.weight_quant is None)
    )


def probe_one(fp_module, quant: dict | None, batches, device: str, fp_grads: dict | None = None) -> tuple[list, dict]:
    """(per-layer rows in forward order, summary) of one quantizer config on ``fp_module``'s latent weights.
    ``fp_grads`` (a dict kept across calls) caches the full-precision gradients by :func:`full_precision_key`: configs
    with the same full-precision function share one backward instead of recomputing it."""
    from quest_pl.callbacks.alignment import cosine, cosine_parts, row_mean_std
    from quest_pl.callbacks.base import diagnosed_layers, operands
    from quest_pl.model import LlamaConfig
    from quest_pl.quant import QuantConfig, full_precision, quantize_model

    module = copy.deepcopy(fp_module)
    model = module.model
    qcfg = QuantConfig.from_cfg(quant, LlamaConfig(**module.hparams.model)) if quant else None
    if qcfg is not None:
        qcfg = QuantConfig(qcfg.name, qcfg.weight, qcfg.act, qcfg.hadamard, kernel="torch")  # masks come from modules
        quantize_model(model, qcfg)
    model.to(device)
    estimators = [
        (name, op, est) for name, layer in diagnosed_layers(model).items() for op, est in operands(layer).items()
    ]
    with torch.no_grad():  # learned scales: data-dependent init on the first batch, before any gradient
        model(batches[0][0].to(device))
    for _, _, est in estimators:
        est.record_mask = True
    g_q = _gradients(model, batches, device, module.loss_fn)
    masked = {"weight": [], "act": []}
    for _, op, est in estimators:
        est.record_mask = False
        if est.last_mask is not None:
            masked[op].append(1.0 - est.last_mask.float().mean().item())
    fp_grads = {} if fp_grads is None else fp_grads
    key = full_precision_key(model)
    if key not in fp_grads:
        with full_precision(model):
            fp_grads[key] = _gradients(model, batches, device, module.loss_fn)
    g_fp = fp_grads[key]
    layers = list(g_q)
    rows, total = [], None
    for i, name in enumerate(layers):
        parts = cosine_parts(g_q[name], g_fp[name])
        mean, std = row_mean_std(parts)
        rows.append(
            {"layer": name, "depth_from_top": len(layers) - 1 - i, "cos": cosine(parts).item(),
             "row_mean": mean.item(), "row_std": std.item()}
        )  # fmt: skip
        whole = {k: parts[k] for k in ("dot", "aa", "bb")}
        total = whole if total is None else {k: total[k] + v for k, v in whole.items()}
    summary = {
        "model_cos": cosine(total).item() if total else float("nan"),
        "row_mean_avg": sum(r["row_mean"] for r in rows) / len(rows),
        "top_row_mean": rows[-1]["row_mean"],
        "bottom_row_mean": rows[0]["row_mean"],
        "mask_weight": sum(masked["weight"]) / len(masked["weight"]) if masked["weight"] else None,
        "mask_act": sum(masked["act"]) / len(masked["act"]) if masked["act"] else None,
    }
    return rows, summary


def figure(results: dict[str, list[dict]]):
    from quest_pl.callbacks.figures import _figure, arm_colors

    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    colors = arm_colors(list(results))
    layers = None
    for name, rows in results.items():
        rows = sorted(rows, key=lambda r: r["depth_from_top"])
        layers = [r["layer"] for r in rows]
        x = [r["depth_from_top"] for r in rows]
        mean = [r["row_mean"] for r in rows]
        std = [r["row_std"] for r in rows]
        c = colors[name]
        ax.plot(x, mean, "o-", ms=3, color=c, label=name)
        ax.fill_between(x, [max(m - s, -1) for m, s in zip(mean, std)], [min(m + s, 1) for m, s in zip(mean, std)],
                        color=c, alpha=0.15,
                        lw=0)  # fmt: skip
    if layers:
        ax.set_xticks(range(len(layers)), [t.replace("blocks.", "b") for t in layers], rotation=60, ha="right",
                      fontsize=6)  # fmt: skip
    ax.set(xlabel="layer, depth from the top (left: next to the head)",
           ylabel="cos(g_Q, g_FP) per row: mean ± std over rows",
           title="Alignment probe: every quantizer on the same weights and batches")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def table(summaries: dict[str, dict]) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    cols = ("quant", "model cos", "row-cos mean (all layers)", "row-cos top layer", "row-cos bottom layer",
            "masked frac W", "masked frac A")  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, s in summaries.items():
        cells = (name, f(s["model_cos"]), f(s["row_mean_avg"]), f(s["top_row_mean"]), f(s["bottom_row_mean"]),
                 f(s["mask_weight"]), f(s["mask_act"]))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """``python run.py probe.from=CKPT probe.quant=[...]``: see the module docstring (the data: the run's own, with
    the ``data.*`` overrides merged over it, :mod:`quest_pl.data.run`). Returns the summaries."""
    from quest_pl.callbacks.figures import save_both
    from quest_pl.data.run import check_model_overrides, data_config
    from quest_pl.io import atomic_write_csv as write_csv
    from quest_pl.io import atomic_write_text
    from quest_pl.ptq import load_checkpoint, module_from_checkpoint

    ckpt_path, names, n_batches, device = check(cfg)
    key = f"probe.from={ckpt_path!r}"
    quants = {name: quant_group(name) for name in names}
    for name, q in quants.items():  # config errors before any work
        from quest_pl.quant import QuantConfig

        try:
            QuantConfig.validate(OmegaConf.create(q))
        except ConfigError as e:
            raise ConfigError(f"probe.quant {name}: {e}") from None
    start = time.perf_counter()
    ckpt = load_checkpoint(ckpt_path, key="probe.from")
    fp_module = module_from_checkpoint(ckpt, ckpt_path, key="probe.from").float().eval()
    hp = ckpt["hyper_parameters"]["model"]
    check_model_overrides(cfg, hp, overrides, key)
    data_cfg = data_config(cfg, ckpt_path, key, overrides, hp["vocab_size"])
    batches = validation_batches(data_cfg, n_batches, hp["seq_len"], hp["vocab_size"], key)
    results, summaries, fp_grads = {}, {}, {}
    for name, q in quants.items():
        t0 = time.perf_counter()
        results[name], summaries[name] = probe_one(fp_module, q if q.get("grid") else None, batches, device, fp_grads)
        log.info("probe %s: model cos %.4f (%.1f s)", name, summaries[name]["model_cos"], time.perf_counter() - t0)
    run_dir = Path(run_dir)
    flat = [{"quant": name, **r} for name, rows in results.items() for r in rows]
    write_csv(flat, run_dir / "probe.csv", ("quant", "layer", "depth_from_top", "cos", "row_mean", "row_std"))
    save_both(figure(results), run_dir / "probe_alignment")
    tokens = sum(b[1].numel() for b in batches)
    text = (
        f"# Alignment probe of `{ckpt_path}`\n\n"
        f"Same latent weights (step {ckpt.get('global_step')}), same {len(batches)} validation batches "
        f"({tokens:,} tokens), fp32 on {device}; {time.perf_counter() - start:.1f} s.\n\n{table(summaries)}\n\n"
        "model cos: cosine of the quantized and full-precision weight gradients over all quantized linears; row-cos: "
        "cosine per output row, mean over rows, then averaged over layers (all), or of the layer next to the head "
        "(top) / the first quantized layer (bottom). Per layer: probe.csv; figure: probe_alignment.pdf/.png.\n"
    )
    atomic_write_text(run_dir / "probe.md", text)
    print(f"\n{text}\nwrote {run_dir / 'probe.md'}, probe.csv, probe_alignment.pdf/.png")
    return summaries
