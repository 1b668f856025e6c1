"""Lightning callbacks: checkpoint-on-interrupt and the diagnostics that observe training without changing it
(gradient alignment, masked fraction and persistence, quantization error; METHOD.md §4, §8)."""

from quest_pl.callbacks.alignment import GradientAlignment
from quest_pl.callbacks.interrupt import SaveOnInterrupt
from quest_pl.callbacks.masks import MaskStatistics
from quest_pl.callbacks.quant_error import QuantizationError

__all__ = ["GradientAlignment", "MaskStatistics", "QuantizationError", "SaveOnInterrupt"]
