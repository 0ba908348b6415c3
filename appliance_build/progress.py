"""Byte progress for long copies: a bar (bytes, rate, ETA) on a terminal, silence otherwise."""
from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def byte_progress(total: int, label: str, enabled: bool | None = None) -> Progress:
    """A progress bar over `total` bytes; by default only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
