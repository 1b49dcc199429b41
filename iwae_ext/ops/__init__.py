"""Typed, differentiable wrappers of the compiled operators (``torch.ops.iwae_ext``).

Each op has CPU and CUDA kernels, a fake kernel (shape inference for torch.compile),
autograd, and a pure-PyTorch twin in :mod:`iwae_ext.ops.reference`.
"""
from . import reference
from ._activation import activation, activation_backward
from ._bayes_linear import bayes_linear
from ._bernoulli import bernoulli_log_prob, bernoulli_log_prob_grad_h
from ._hmc_steps import AcceptResult, hmc_accept, hmc_leapfrog
from ._logmeanexp import logmeanexp, logmeanexp_backward, logmeanexp_stats
from ._random import keyed_normal, keyed_uniform

# Every operator of the library, as named in torch.ops.iwae_ext.
OP_NAMES = ("logmeanexp", "logmeanexp_stats", "logmeanexp_backward", "bayes_linear", "bayes_linear_backward", "hmc_leapfrog",
            "hmc_leapfrog_backward", "hmc_accept", "keyed_random", "bernoulli_log_prob",
            "bernoulli_log_prob_backward", "bernoulli_log_prob_grad_h", "bernoulli_log_prob_dlogit",
            "activation", "activation_backward")

__all__ = ["logmeanexp", "logmeanexp_stats", "logmeanexp_backward", "bayes_linear", "bernoulli_log_prob",
           "bernoulli_log_prob_grad_h", "hmc_leapfrog", "hmc_accept", "AcceptResult",
           "keyed_normal", "keyed_uniform", "activation", "activation_backward",
           "reference", "OP_NAMES"]
