"""tocsin's version: from the installed package's metadata, else from pyproject.toml beside the source."""
from __future__ import annotations

import functools
import tomllib
from importlib import metadata
from pathlib import Path


@functools.cache
def version() -> str:
    """The version string, e.g. "0.1.0"; "unknown" when neither source has one."""
    try:
        return metadata.version("tocsin")
    except metadata.PackageNotFoundError:
        pass
    # Running from a source tree that was never installed (python -m daemon from a checkout).
    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
