"""Deprecated path of :mod:`iwae_ext.trainer.checkpoint`."""
from .._deprecated import moved

moved(__name__, "iwae_ext.trainer.checkpoint")
