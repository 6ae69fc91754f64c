"""Progress bars: shown on a terminal, quiet in logs (CI, redirected output)."""

from __future__ import annotations

from tqdm import tqdm


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=None, mininterval=0.5, leave=False, **kw)
