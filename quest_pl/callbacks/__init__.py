"""Lightning callbacks: checkpoint-on-interrupt and the diagnostics that observe training without changing it."""

from quest_pl.callbacks.interrupt import SaveOnInterrupt

__all__ = ["SaveOnInterrupt"]
