"""`baton router` start-up: configuration, the checkpoint's tokenizer, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baton.operator.spec import WorkerConfig
from baton.workers.router.balancer import Balancer
from baton.workers.router.discovery import DnsResolver, StaticResolver
from baton.workers.router.main import build_router, main
from baton.workers.router.tokenization import CheckpointTokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"


def config(tmp_path: Path, **router) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "model": "tiny", "servedModelName": "tiny-chat", "modelPath": str(TINY),
        "engine": {"maxModelLen": 256},
        "router": {"routing": "round-robin", "maxQueuedRequests": 3,
                   "requestTimeoutSeconds": 42, "transferTimeoutSeconds": 7,
                   "maxRequestBodyBytes": 65536, **router}}))
    return path


def test_build_router_from_worker_config(tmp_path):
    cfg = WorkerConfig.load(config(tmp_path))
    router = build_router(cfg, "10.0.0.1:50051,10.0.0.2:50051", "tiny-decode.llm.svc:50051")
    s = router.settings
    assert (s.served_model_name, s.max_model_len, s.request_timeout_s,
            s.max_queued_requests, s.max_body_bytes) == ("tiny-chat", 256, 42, 3, 65536)
    backend = router.backend
    assert backend.transfer_timeout_s == 7
    assert isinstance(backend.balancer, Balancer) and backend.balancer.routing == "round-robin"
    assert backend.prefill.resolver == StaticResolver(("10.0.0.1:50051", "10.0.0.2:50051"))
    assert backend.decode.resolver == DnsResolver("tiny-decode.llm.svc", 50051)
    assert router.metrics.labels.role == "router" and router.metrics.labels.model == "tiny"


def test_checkpoint_tokenizer_renders_the_chat_template():
    tok = CheckpointTokenizer(TINY)
    assert tok.vocab_size == 512
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.render_chat(messages, {}).endswith("assistant\n<think>\n")
    without = tok.render_chat(messages, {"enable_thinking": False})
    assert without.endswith("assistant\n<think></think>") and "Hi" in without
    assert tok.decode(tok.encode("hello world")) == "hello world"
    # The batch call it tokenizes with gives the engine tokenizer's ids.
    text = tok.render_chat(messages, {})
    assert tok.encode(text, add_special_tokens=False) == tok._tokenizer.encode(
        text, add_special_tokens=False)
    # Special tokens are dropped when decoding output, except the markup the output
    # processing reads.
    im_end = tok._tokenizer.token_to_id("<|im_end|>")
    assert tok.decode([im_end]) == "" and tok.decode([im_end], False) == "<|im_end|>"
    assert tok.max_token_bytes == max(len(tok.decode([i], False).encode()) for i in range(512))


@pytest.mark.parametrize("args, message", [
    (["--prefill", "h:1", "--decode", "h:2", "--plaintext"], "No such file"),
    (["--prefill", "nope", "--decode", "h:2", "--plaintext"], "host:port"),
    (["--prefill", "h:1", "--decode", "h:2", "--certs", "no-certs"], "cannot read ca.crt"),
])
def test_main_reports_bad_setup(tmp_path, capsys, args, message):
    cfg = (config(tmp_path) if "nope" in args or "--certs" in args
           else tmp_path / "missing.json")
    assert main(["--config", str(cfg), *args]) == 2
    assert message in capsys.readouterr().err


def test_main_reports_a_missing_api_keys_file(tmp_path, capsys):
    cfg = config(tmp_path, apiKeysFile=str(tmp_path / "no-keys"))
    assert main(["--config", str(cfg), "--prefill", "h:1", "--decode", "h:2",
                 "--plaintext"]) == 2
    assert "no-keys" in capsys.readouterr().err
