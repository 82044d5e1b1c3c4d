"""baton.operator: the Model custom resource, its builders, the Kopf handlers and the autoscaler.

Never imports baton.workers or baton.kernels (the operator image has no torch).
"""
