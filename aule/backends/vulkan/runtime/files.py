"""Where the runtime keeps files between processes: the pipeline cache and the EGL manifest."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from .... import settings


def user_cache_dir() -> Path:
    """Per-user cache folder for aule (pipeline caches, ICD manifests)."""
    chosen = settings.vulkan().cache_dir
    if chosen:
        return Path(chosen)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "aule"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "aule"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aule"


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so another process never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
