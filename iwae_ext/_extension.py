"""Loads the compiled library iwae_ext._C, with errors that say how to fix a bad build."""
import importlib

import torch

REBUILD = "pip install --no-build-isolation -e .  (from the iwae_ext source directory)"


def _base_version(version: str) -> str:
    return version.split("+")[0]


def load():
    """Import iwae_ext._C (registering torch.ops.iwae_ext) and check it matches this torch."""
    try:
        lib = importlib.import_module("iwae_ext._C")
    except ModuleNotFoundError as err:
        if err.name != "iwae_ext._C":
            raise
        raise ImportError(
            "iwae_ext: the compiled extension iwae_ext._C is missing (the package was not "
            f"built, or was copied without it). Build it with: {REBUILD}"
        ) from err
    except ImportError as err:
        raise ImportError(
            f"iwae_ext: the compiled extension iwae_ext._C failed to load ({err}). It was "
            f"probably built against another torch than the {torch.__version__} imported "
            f"now. Rebuild it with: {REBUILD}"
        ) from err
    built = lib.built_with_torch
    if built != _base_version(torch.__version__):
        raise ImportError(
            f"iwae_ext: the compiled extension iwae_ext._C was built against torch {built}, "
            f"but torch {torch.__version__} is imported. Rebuild it with: {REBUILD}"
        )
    return lib
