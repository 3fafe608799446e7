"""Alpha ramps while blending: linear, cosine, sigmoid, as tensors per env."""

from __future__ import annotations

import math

import torch

from esper.leyline import AlphaSchedule

_SIG_LO = 1.0 / (1.0 + math.exp(6.0))
_SIG_HI = 1.0 / (1.0 + math.exp(-6.0))


def alpha_ramp(progress: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """Fraction of the alpha target reached at ``progress`` in [0, 1], per env's schedule.

    All three shapes start at exactly 0 and end at exactly 1.
    """
    p = progress.clamp(0.0, 1.0)
    linear = p
    cosine = 0.5 * (1.0 - torch.cos(math.pi * p))
    sigmoid = (torch.sigmoid(12.0 * (p - 0.5)) - _SIG_LO) / (_SIG_HI - _SIG_LO)
    out = torch.where(schedule == AlphaSchedule.COSINE, cosine, linear)
    out = torch.where(schedule == AlphaSchedule.SIGMOID, sigmoid, out)
    return out.clamp(0.0, 1.0)
