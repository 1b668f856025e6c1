"""The weight's codes once per optimizer step (METHOD.md §5): within gradient accumulation the latent weight does not
change between micro-batches, so its quantized codes, mask and scales are computed once and reused until the weight
is written.

The key is the tensor's storage address and its version counter (`Tensor._version`, which every in-place write bumps:
an optimizer step, `copy_`, `load_state_dict`), plus its shape, strides, dtype and the quantizer's arguments. An entry
holds a reference to the tensor, so its memory cannot be handed to another tensor while the entry exists (an address
alone could be reused with the same version number). Only tensors that require a gradient are cached (parameters:
long-lived, one slot each); the cache is skipped while a CUDA graph is captured (a replay would never recompute) and
while torch.compile traces. Writes through `.data` bypass the version counter and are not seen: use in-place ops.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

MAX_ENTRIES = 4096
enabled = True  # False: always recompute (benchmarks of one micro-batch per optimizer step)
_ENTRIES: OrderedDict[tuple, tuple] = OrderedDict()
stats = {"hits": 0, "misses": 0}


def _cacheable(weight: torch.Tensor) -> bool:
    if not enabled or not weight.requires_grad or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if torch.compiler.is_compiling():
        return False
    return not (weight.is_cuda and torch.cuda.is_current_stream_capturing())


def cached(weight: torch.Tensor, args: tuple, compute: Callable[[], tuple]) -> tuple:
    """`compute()` for `weight` and the hashable quantizer arguments `args`, reused while the weight is unchanged."""
    if not _cacheable(weight):
        return compute()
    slot = (weight.data_ptr(), str(weight.device), args)
    key = (weight._version, tuple(weight.shape), weight.stride(), weight.dtype)
    entry = _ENTRIES.get(slot)
    if entry is not None and entry[0] == key:
        stats["hits"] += 1
        _ENTRIES.move_to_end(slot)
        return entry[2]
    stats["misses"] += 1
    out = compute()
    _ENTRIES[slot] = (key, weight, out)
    _ENTRIES.move_to_end(slot)
    while len(_ENTRIES) > MAX_ENTRIES:
        _ENTRIES.popitem(last=False)
    return out


def clear() -> None:
    """Drop every entry (and the references to their weights)."""
    _ENTRIES.clear()
