"""Checkpoint writing: atomic saves on any filesystem, and the run's config stored in every checkpoint.

Module-level classes (not built inside functions) so a trainer holding them pickles, as ``ddp_spawn`` requires."""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from quest_pl.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing through :func:`quest_pl.io.atomic_path`: the temporary file is in the
    checkpoint's own directory (never ``$TMPDIR``), fsynced, then renamed over the old file, so a kill or a full disk
    leaves the previous checkpoint intact whatever filesystem the run dir is on."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class SaveRunConfig(L.Callback):
    """Stores the composed config's training groups in every checkpoint (``quest_pl_config``, plain types:
    ``weights_only`` loads it), so a resume can be compared with what the checkpoint was trained with
    (:func:`quest_pl.config.check_resume`)."""

    def __init__(self, container: dict):
        self.container = container

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["quest_pl_config"] = self.container
