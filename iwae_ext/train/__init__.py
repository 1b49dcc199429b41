"""Deprecated path. The trainer's modules are in :mod:`iwae_ext.trainer`; ``iwae_ext.train`` is
the function that trains; ``python -m iwae_ext.train`` is ``python -m iwae_ext.cli.train``.

Importing this package still works for one release: it warns, its attributes are those of
:mod:`iwae_ext.trainer`, and calling it trains, so ``iwae_ext.train(...)`` keeps working after
an old ``import iwae_ext.train``."""
import sys as _sys
import types as _types
import warnings as _warnings

from .. import trainer as _trainer

_warnings.warn("the package iwae_ext.train moved to iwae_ext.trainer (iwae_ext.train is the function "
               "that trains; python -m iwae_ext.train is python -m iwae_ext.cli.train); the old path "
               "will be removed in the next release", FutureWarning, stacklevel=2)


class _CallableTrainModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _trainer.train(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(_trainer, name)


_sys.modules[__name__].__class__ = _CallableTrainModule
