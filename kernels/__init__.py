"""baton.kernels: Triton kernels, each beside its pure-torch reference (torch/triton only).

The model imports QuantLinear, QuantExperts, route and set_backend from here (expert
parallelism: baton.kernels.ep), and the Mamba2 and attention kernels of its hot path: the
varlen prefill scan (MambaChunks, causal_conv1d, mamba_chunk_scan), the slot-indexed decode
and verification steps (causal_conv1d_update, ssm_state_update) and attention over the paged
KV cache (paged_attention for decode / verify, prefill_attention for prompt chunks). Kernels
compile on their first launch; on a machine without a GPU they run only under
TRITON_INTERPRET=1 (set before this import), and set_backend "auto" keeps CPU tensors on the
torch reference.
"""

from baton.kernels.attention_decode import paged_attention
from baton.kernels.attention_prefill import prefill_attention
from baton.kernels.backend import set_backend
from baton.kernels.experts import QuantExperts
from baton.kernels.formats import WeightFormat
from baton.kernels.linear import QuantLinear
from baton.kernels.mamba_common import MambaChunks
from baton.kernels.mamba_conv import causal_conv1d
from baton.kernels.mamba_conv_step import causal_conv1d_update
from baton.kernels.mamba_step import ssm_state_update
from baton.kernels.routing import route
from baton.kernels.ssd_combined import mamba_chunk_scan

__all__ = ["MambaChunks", "QuantExperts", "QuantLinear", "WeightFormat", "causal_conv1d",
           "causal_conv1d_update", "mamba_chunk_scan", "paged_attention", "prefill_attention",
           "route", "set_backend", "ssm_state_update"]
