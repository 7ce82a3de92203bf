"""Progress bars that stay quiet when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(it: Iterable, desc: str, total: int | None = None, enabled: bool | None = None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, file=sys.stderr)
