"""gRPC metadata keys that the workers and the router share (DESIGN.md, Seams: router semantics)."""

# Trailing metadata of a Prefill that failed in its transfer to the decode worker (value:
# "decode"): that worker is to blame, not the prefill worker, though both calls end
# UNAVAILABLE when the decode worker died.
FAILED_PEER = "baton-failed-peer"
