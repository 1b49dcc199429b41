"""The command lines: ``iwae-train`` (:mod:`iwae_ext.cli.train`) and ``iwae-eval``
(:mod:`iwae_ext.cli.eval`); each module runs with ``python -m`` and under ``torchrun -m``.

``train_main``, ``eval_main`` and ``train_parser`` are their ``main`` functions and the training
parser, loaded on first use (so that ``python -m iwae_ext.cli.train`` runs a fresh module)."""
import importlib as _importlib

__all__ = ["train_main", "eval_main", "train_parser"]
_WHERE = {"train_main": ("train", "main"), "eval_main": ("eval", "main"), "train_parser": ("train", "parser")}


def __getattr__(name):
    if name in _WHERE:
        module, attr = _WHERE[name]
        return getattr(_importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'iwae_ext.cli' has no attribute {name!r}")
