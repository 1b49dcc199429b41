"""Old import paths that keep working for one release, with a warning (FutureWarning, which
Python shows by default) that names the new path."""
from __future__ import annotations

import importlib
import sys
import warnings


def moved(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that module ``old`` moved to ``new`` and make ``import old`` give ``new``."""
    warnings.warn(f"{old} moved to {new}; the old path will be removed in the next release",
                  FutureWarning, stacklevel=stacklevel)
    sys.modules[old] = importlib.import_module(new)
