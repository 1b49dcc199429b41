"""Samplers: batched HMC, annealed importance sampling (AIS) and its schedules.

- :func:`ais`: AIS from a normalised initial density to an unnormalised target over C
  independent chains with HMC transitions (fused ops ``hmc_leapfrog`` / ``hmc_accept``);
  ``log_weights`` estimate log Z by their log-mean-exp. Step sizes are fixed, or adapted by
  pilot chains of their own, so the reported weights stay unbiased.
- :func:`mirrored_schedule`: a forward run's step sizes for the reverse run (BDMC).
- :func:`hmc`: plain HMC sampling of a target with per-chain step sizes adapted during warm-up.
- :func:`linear_schedule`, :func:`sigmoid_schedule`: inverse temperatures from 0 to 1.
- :func:`model_ais_densities`: the initial density and target of AIS for a package model and data,
  with the hand-written decoder gradient where the model allows it.
- :func:`sir`: sampling-importance-resampling from q_IW (Cremer et al., Algorithm 1).
"""
from ._hmc_ais import (AISResult, HMCResult, StepSizeAdaptation, ais, hmc, linear_schedule,
                   mirrored_schedule, sigmoid_schedule)
from ._model import ModelAIS, model_ais_densities
from ._sir import sir

__all__ = ["ais", "hmc", "AISResult", "HMCResult", "StepSizeAdaptation", "linear_schedule",
           "sigmoid_schedule", "mirrored_schedule", "ModelAIS", "model_ais_densities", "sir"]
