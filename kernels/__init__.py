"""baton.kernels: Triton kernels, each beside its pure-torch reference (torch/triton only).

The model imports QuantLinear, QuantExperts and route from here; Triton is imported only when
a module's backend is "triton".
"""

from baton.kernels.backend import set_backend
from baton.kernels.experts import QuantExperts
from baton.kernels.formats import WeightFormat
from baton.kernels.linear import QuantLinear
from baton.kernels.routing import route

__all__ = ["QuantExperts", "QuantLinear", "WeightFormat", "route", "set_backend"]
