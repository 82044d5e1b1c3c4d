"""baton's router: the OpenAI-compatible HTTP API in front of prefill and decode workers.

    baton router --config FILE --prefill SERVICE --decode SERVICE --port 8000

server.py holds the HTTP API (params.py validates bodies, responses.py and text.py turn
tokens into OpenAI responses, admission.py is the bounded queue, auth.py the API keys),
backend.py the seam to whatever produces tokens, disaggregated.py the production backend
(decode Generate + prefill Prefill over gRPC, with one retry), discovery.py and balancer.py
the worker pools and the worker choice.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    # Imported here so that `import baton.workers.router` stays cheap for the CLI dispatcher.
    from baton.workers.router.main import main as run

    return run(argv)
