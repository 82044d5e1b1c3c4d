"""POST /tokenize and /detokenize, in vLLM's shapes.

    /tokenize    {"prompt": str, "add_special_tokens": true}
                 or {"messages": [...], "add_generation_prompt": true, "tools": [...],
                     "chat_template_kwargs": {...}}   (the chat template, as chat renders it)
                 + "return_token_strs": false
              -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [ids]} -> {"prompt": text}

"model" may be given (it must be the served model). Tokenizing is bounded like a prompt: a
text of more tokens than the context is a 400 context_length_exceeded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from baton.workers.router.errors import bad_request, invalid_type
from baton.workers.router.params import ParsedRequest, parse_messages
from baton.workers.router.tools import parse_tool_choice, parse_tools

if TYPE_CHECKING:
    from baton.workers.router.server import Router


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise invalid_type(name, v, "a boolean")
    return v


def _object(body: Any, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_body")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}",
                          param=unknown[0], code="unknown_parameter")
    return body


class TokenizeApi:
    def __init__(self, router: Router) -> None:
        self.router = router

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)

    async def tokenize(self, request: web.Request) -> web.Response:
        router = self.router
        body = await router.read_request(request, lambda b: _object(b, {
            "model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
            "return_token_strs", "tools", "chat_template_kwargs"}))
        router.check_model(body.get("model"))
        strs = _flag(body, "return_token_strs", False)
        if ("prompt" in body) == ("messages" in body):
            raise bad_request("tokenize: give either prompt or messages", param="prompt",
                              code="invalid_value")
        if "prompt" in body:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise invalid_type("prompt", prompt, "a string")
            ids = await router.encode(prompt, "prompt", _flag(body, "add_special_tokens", True))
        else:
            kwargs = body.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise invalid_type("chat_template_kwargs", kwargs, "an object")
            tools = parse_tools(body.get("tools"))
            parsed = ParsedRequest("chat", "", messages=parse_messages(body["messages"]),
                                   chat_template_kwargs=dict(kwargs), tools=tools,
                                   tool_choice=parse_tool_choice(None, tools))
            kwargs = router.template_kwargs(parsed)
            if not _flag(body, "add_generation_prompt", True):
                kwargs["add_generation_prompt"] = False
            text = await router.render_chat(parsed.messages, kwargs)
            ids = await router.encode(text, "messages",
                                      _flag(body, "add_special_tokens", False))
        return web.json_response({
            "count": len(ids), "max_model_len": router.settings.max_model_len, "tokens": ids,
            "token_strs": router.tokenizer.token_strs(ids) if strs else None})

    async def detokenize(self, request: web.Request) -> web.Response:
        router = self.router
        body = await router.read_request(request, lambda b: _object(b, {"model", "tokens"}))
        router.check_model(body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise invalid_type("tokens", tokens, "a list of token ids (integers >= 0)")
        router.check_ids(tokens, "tokens")
        return web.json_response({"prompt": router.tokenizer.decode(tokens)})
