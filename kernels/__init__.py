"""baton.kernels: Triton kernels, each beside its pure-torch reference (torch/triton only).

The model imports QuantLinear, QuantExperts, route and set_backend from here (expert
parallelism: baton.kernels.ep). Kernels compile on their first launch; on a machine without a
GPU they run only under TRITON_INTERPRET=1 (set before this import), and set_backend "auto"
keeps CPU tensors on the torch reference.
"""

from baton.kernels.backend import set_backend
from baton.kernels.experts import QuantExperts
from baton.kernels.formats import WeightFormat
from baton.kernels.linear import QuantLinear
from baton.kernels.routing import route

__all__ = ["QuantExperts", "QuantLinear", "WeightFormat", "route", "set_backend"]
