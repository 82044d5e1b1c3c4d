"""baton's router: the OpenAI-compatible HTTP API in front of prefill and decode workers.

    baton router --config FILE --prefill SERVICE --decode SERVICE --port 8000

server.py holds the HTTP app and a request's life (request_body.py reads and decodes
bodies, params.py / tools.py / responses_request.py validate them, tokenization.py tokenizes
bounded, grammar.py builds structured-output grammars, generation.py runs a request's
choices, output.py turns each choice's tokens into content, reasoning (reasoning.py) and tool
calls (tool_calls.py)); completions_api.py, responses_api.py and tokenize_api.py shape the
endpoints' answers (bodies.py: the OpenAI chat / completion bodies); admission.py is the
bounded queue, auth.py the API keys; backend.py the seam to whatever produces tokens,
disaggregated.py the production backend (decode Generate + prefill Prefill over gRPC, with
one retry), discovery.py and balancer.py the worker pools and the worker choice.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    # Imported here so that `import baton.workers.router` stays cheap for the CLI dispatcher.
    from baton.workers.router.main import main as run

    return run(argv)
