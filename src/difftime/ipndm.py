"""iPNDM's Adams-Bashforth weights (Zhang & Chen 2023), for :func:`difftime.sampling.ipndm`.

Notation as in :mod:`difftime.sampling`: x_tilde = x/m and sigma_tilde = sigma/m, in which the
PF-ODE reads dx_tilde/dsigma_tilde = eps_hat(x, t). iPNDM takes an Adams-Bashforth step on the stored
eps_hats e_i, e_{i-1}, ... at order min(4, i + 1) (warm-up 1, 2, 3):

    x_tilde_{i+1} = x_tilde_i + (sigma_tilde_{i+1} - sigma_tilde_i) sum_j b_j e_{i-j},

in x: x_{i+1} = (m_{i+1}/m_i) x_i + m_{i+1} (sigma_tilde_{i+1} - sigma_tilde_i) sum_j b_j e_{i-j}.

On a grid uniform in sigma_tilde the b_j are the classic (1), (3, -1)/2, (23, -16, 5)/12 and
(55, -59, 37, -9)/24 (``IPNDM_COEFFICIENTS``, k-diffusion's ``sample_ipndm``). On any other grid (the
log-SNR grid is geometric in sigma_tilde) these fixed weights make the method second order only, so
the sampler's default (``variable_step=True``) uses the Adams-Bashforth weights of the actual nodes:
the integral over the step of the polynomial through the stored (sigma_tilde, eps_hat) pairs,
divided by the step (:func:`adams_bashforth_coefficients`).

Reference: iPNDM, https://arxiv.org/abs/2204.13902.

>>> [round(12 * b, 12) for b in adams_bashforth_coefficients([0.0, -1.0, -2.0])]  # the uniform grid
[23.0, -16.0, 5.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

IPNDM_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
_GAUSS_LEGENDRE_2 = (0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3))  # on [0, 1], weights 1/2


def adams_bashforth_coefficients(u: Sequence[float]) -> list[float]:
    """Variable-step Adams-Bashforth weights b_j = int_0^1 L_j(v) dv for nodes u_0 = 0 > u_1 > ...

    L_j is the Lagrange basis polynomial of the nodes (degree <= 3 for up to 4 nodes, so the
    2-point Gauss-Legendre rule integrates it exactly). The nodes are the earlier abscissae in units
    of the current step, u_j = (s_{i-j} - s_i) / (s_{i+1} - s_i); a uniform grid has u_j = -j and
    gives the classic (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24.
    """
    weights = []
    for j, uj in enumerate(u):
        b = 0.0
        for v in _GAUSS_LEGENDRE_2:
            basis = 1.0
            for k, uk in enumerate(u):
                if k != j:
                    basis *= (v - uk) / (uj - uk)
            b += 0.5 * basis
        weights.append(b)
    return weights
