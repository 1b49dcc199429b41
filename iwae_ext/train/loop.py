"""Deprecated path of :mod:`iwae_ext.trainer.loop`."""
from .._deprecated import moved

moved(__name__, "iwae_ext.trainer.loop")
