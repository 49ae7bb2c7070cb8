"""Where yoloscale keeps what it measured or compiled for the next run on this machine (memory models, torch.compile's
kernels): $YOLOSCALE_CACHE, else $XDG_CACHE_HOME/yoloscale or ~/.cache/yoloscale."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(
        os.environ.get("YOLOSCALE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "yoloscale")
    )
