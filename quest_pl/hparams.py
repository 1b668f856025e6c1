"""TensorBoard's HPARAMS tab: one row per run with the arm, the seed and the keys that tell the runs apart, linked to
``val/loss`` and ``val/ppl``.

* A training run writes a compact set when it starts (:func:`run_values`): ``arm``, ``seed`` and the ``quant`` group's
  keys. A PTQ evaluation writes ``arm`` (its PTQ name), ``seed`` (of the checkpoint's run) and its ``ptq.*`` settings.
* A run cannot know which keys differ from the other arms of its sweep; the sweep report does
  (:func:`write_sweep_hparams`, called by :func:`quest_pl.report.write_report`): it writes into every job's
  ``tensorboard/`` (PTQ runs included) an event file holding only ``arm``, ``seed`` and the configuration keys whose
  values differ across the sweep's jobs, rewritten (atomically) each time the report is.

TensorBoard (2.x, its Rust data server and its Python loader alike) keeps the **first** hparams summary it reads in a
run and reads a run's event files in file-name order, so the report's file is named to sort before any file a writer
names (``events.out.tfevents.<unix time>...``): :data:`SWEEP_EVENT_FILE`. A TensorBoard already open keeps what it has
read: restart it after the report.
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("val/loss", "val/ppl")
SWEEP_EVENT_FILE = "events.out.tfevents.0000000000.quest_pl_sweep_hparams"
CONFIG_GROUPS = ("model", "optim", "data", "quant", "trainer")


def flatten(node, prefix: str) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}``; lists as their string, nested dicts recursively."""
    out = {}
    for k, v in (node or {}).items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out |= flatten(v, key)
        else:
            out[key] = str(list(v)) if isinstance(v, (list, tuple)) else v
    return out


def config_values(cfg: dict) -> dict:
    """Every key of the groups a run is compared on (:data:`CONFIG_GROUPS`) of a resolved config, flattened."""
    out = {}
    for group in CONFIG_GROUPS:
        out |= flatten(cfg.get(group), group)
    return out


def run_values(cfg) -> dict:
    """What a training run lists on its own: ``arm`` (:func:`quest_pl.config.names.arm_name`), ``seed``, ``quant.*``."""
    from omegaconf import OmegaConf

    from quest_pl.config.names import arm_name

    quant = OmegaConf.to_container(cfg.quant, resolve=True) or {}
    return {"arm": arm_name(cfg.quant), "seed": cfg.seed, **flatten(quant, "quant")}


def _plain(v):
    """A value the hparams plugin shows as written: numbers stay numbers, booleans and None become strings."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return v if isinstance(v, (int, float, str)) else str(v)


def summaries(values: dict, columns: dict | None = None, metrics=METRICS) -> list:
    """The hparams plugin's three summaries (experiment, session start, session end) for one run. ``columns`` (key ->
    an example value) fixes the experiment's columns; by default those of ``values``. None shows as ``null``; a key
    not in ``values`` leaves the run's cell blank."""
    from torch.utils.tensorboard.summary import hparams

    values = {k: _plain(v) for k, v in values.items()}
    columns = values if columns is None else {k: _plain(v) for k, v in columns.items()}
    exp, _, _ = hparams(columns, dict.fromkeys(metrics, 0.0))
    _, ssi, sei = hparams(values, dict.fromkeys(metrics, 0.0))
    return [exp, ssi, sei]


def write(logger, values: dict) -> None:
    """Write ``values`` to a Lightning ``TensorBoardLogger``'s event file (no placeholder ``hp_metric`` scalar)."""
    writer = logger.experiment._get_file_writer()
    for summary in summaries(values):
        writer.add_summary(summary)
    writer.flush()


# The CUSTOM SCALARS tab: what to watch first, in this order (TensorBoard's other tabs sort tag groups alphabetically).
# Chart entries are regular expressions over tags.
LAYOUT = {
    "train / val": {
        "loss (train and val, nats/token)": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "val perplexity": ["Multiline", ["^val/ppl$"]],
        "learning rate": ["Multiline", ["^train/lr$"]],
        "throughput (tokens/s)": ["Multiline", ["^train/tokens_per_sec$"]],
    },
    "learned scales (LSQ step, PACT clip level)": {
        "weights": ["Multiline", ["^quant_scale/.*/weight$"]],
        "activations": ["Multiline", ["^quant_scale/.*/act$"]],
    },
}


def write_layout(logger) -> None:
    """The CUSTOM SCALARS tab's layout (:data:`LAYOUT`): train and val first, then the learned scales."""
    from torch.utils.tensorboard.summary import custom_scalars

    writer = logger.experiment._get_file_writer()
    writer.add_summary(custom_scalars(LAYOUT))
    writer.flush()


def write_event_file(path: Path, summary_list: list) -> None:
    """A TensorBoard event file at ``path`` (exactly that name, written atomically) holding ``summary_list``, written
    by TensorBoard's own ``SummaryWriter`` into a temporary directory beside it: the writer names its files by the
    time, and the sweep's file must sort first (:data:`SWEEP_EVENT_FILE`)."""
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    from quest_pl.io import TMP_PREFIX, atomic_write_bytes

    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=path.parent) as tmp:
        writer = SummaryWriter(log_dir=tmp)
        file_writer = writer._get_file_writer()
        for summary in summary_list:
            file_writer.add_summary(summary)
        writer.close()
        (written,) = Path(tmp).glob("events.out.tfevents.*")
        atomic_write_bytes(path, written.read_bytes())


def differing_keys(records: list[dict]) -> list[str]:
    """Keys whose values differ across ``records`` (a key some records lack differs too), in first-appearance order."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    absent = object()
    return [k for k in keys if len({repr(_plain(r[k])) if k in r else absent for r in records}) > 1]


def sweep_values(jobs: list[dict]) -> list[dict]:
    """Per job (``{"arm", "seed", "kind", "values"}``, ``values`` its flattened settings): ``arm``, ``seed`` and the
    keys that differ across the jobs of the same ``kind`` (``train`` or ``ptq``: a PTQ run has no ``quant`` keys and a
    trained one no ``ptq`` keys); a job without such a key leaves its cell blank. ``seed`` is listed once."""
    kinds: dict[str, list[dict]] = {}
    for j in jobs:
        kinds.setdefault(j.get("kind", "train"), []).append(j["values"])
    keys = list(dict.fromkeys(k for records in kinds.values() for k in differing_keys(records) if k != "seed"))
    return [{"arm": j["arm"], "seed": j["seed"], **{k: j["values"][k] for k in keys if k in j["values"]}} for j in jobs]


def write_sweep_hparams(tb_dirs: list[Path], per_job: list[dict]) -> list[Path]:
    """Write :data:`SWEEP_EVENT_FILE` into each ``tensorboard/`` directory with that job's values; every file lists
    the same columns (a column mixing numbers with null or strings is written as strings). Returns the files
    written."""
    per_job = [dict(values) for values in per_job]
    columns: dict = {}
    for key in dict.fromkeys(k for values in per_job for k in values):
        present = [values for values in per_job if key in values]
        if len({isinstance(_plain(values[key]), str) for values in present}) > 1:  # numbers mixed with null/strings
            for values in present:
                values[key] = str(_plain(values[key]))
        columns[key] = next((values[key] for values in present if values[key] is not None), "null")
    written = []
    for tb, values in zip(tb_dirs, per_job):
        if not tb.is_dir():
            continue
        path = tb / SWEEP_EVENT_FILE
        write_event_file(path, summaries(values, columns))
        written.append(path)
    return written


def read(tb_dir: str | Path) -> tuple[list[str], dict]:
    """What TensorBoard's hparams tab shows for the run in ``tb_dir``: (columns of its experiment, its values), read as
    TensorBoard's loader reads them (first summary per tag, files in name order)."""
    from google.protobuf import json_format
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: json_format.MessageToDict(v) for k, v in start.hparams.items()}
    return [h.name for h in exp.hparam_infos], values
