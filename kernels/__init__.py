"""baton.kernels: Triton kernels, each beside its pure-torch reference (torch/triton only)."""
