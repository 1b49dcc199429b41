"""Deprecated path of :mod:`iwae_ext.trainer.final`."""
from .._deprecated import moved

moved(__name__, "iwae_ext.trainer.final")
