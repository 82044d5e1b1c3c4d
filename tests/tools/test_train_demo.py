"""The demo model's training script: a few steps of the smoke recipe give a loadable
checkpoint with the committed chat template, the same history from the same seed, and a loss
curve; chats are trained on their assistant tokens only."""

from __future__ import annotations

import json
import random

import demo_chats
import demo_tokenizer
import pytest
import torch
import train_demo

from baton.workers.model import load_model
from baton.workers.model.config import NemotronHConfig
from baton.workers.model.model import NemotronHModel
from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE
from baton.workers.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    first = tmp_path_factory.mktemp("smoke_a")
    second = tmp_path_factory.mktemp("smoke_b")
    record = train_demo.main(["--config", "smoke", "--steps", "3", "--seed", "5",
                              "--out", str(first)])
    again = train_demo.main(["--config", "smoke", "--steps", "2", "--seed", "5",
                             "--out", str(second)])
    return first, record, second, again


def test_same_seed_same_history_and_tokenizer(smoke_runs):
    first, record, second, again = smoke_runs
    keys = ("code", "chat", "echo", "code_mtp1", "code_mtp2", "grad_norm", "expert_load_max")
    assert [{k: h[k] for k in keys} for h in record["history"][:2]] == [
        {k: h[k] for k in keys} for h in again["history"]]
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert record["history"][-1]["chat"] < record["history"][0]["chat"]
    expected = train_demo.autocast_dtype(torch.device("cpu"), "auto")
    assert record["compute_dtype"] == str(expected).removeprefix("torch.")


def test_checkpoint_loads_with_every_layer_kind_and_the_template(smoke_runs):
    path, record, _, _ = smoke_runs
    model = load_model(path, dtype=torch.float32)
    assert set(model.layer_kinds) == {"mamba", "attention", "moe"}
    assert model.num_mtp_layers == 2 and model.config.moe_latent_size
    assert model.config.n_shared_experts == 1
    saved = json.loads((path / "training.json").read_text())
    assert saved["steps"] == 3 and len(saved["history"]) == 3 and saved["evals"]
    assert (path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template == NEMOTRON3_CHAT_TEMPLATE
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids and tokenizer.token_to_id("</s>") in (
        tokenizer.eos_token_ids)
    for marker in demo_tokenizer.MARKUP_TOKENS:
        ids = tokenizer.encode(f"x{marker}y")
        assert tokenizer.token_to_id(marker) in ids
        # Not special: the markup stays in decoded text for the router's parsers.
        assert marker in tokenizer.decode(ids)
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user")) == "user"
    digits = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in digits] == list("12345")


def test_chats_train_on_assistant_tokens_only(smoke_runs):
    path = smoke_runs[0]
    tokenizer = train_demo.chat_tokenizer(load_tokenizer(path).backend)
    chat = demo_chats.make_chat(random.Random(11))
    ids, mask = train_demo.encode_chat(tokenizer, chat)
    text = train_demo.render(tokenizer, chat)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    # The masked tokens are exactly the assistant turns, each through its <|im_end|>.
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    turns = [part.split("<|im_end|>")[0] + "<|im_end|>"
             for part in text.split("<|im_start|>assistant\n")[1:]]
    assert trained == "".join(turns)
    assert sum(mask) < len(ids) / 2



def test_initialize_scales_the_tied_embeddings_apart_from_the_other_weights():
    config = NemotronHConfig.from_dict({"model_type": "nemotron_h", **train_demo.DEMO_CONFIG})
    model = NemotronHModel(config, dtype=torch.float32)
    embeddings = model.backbone.embeddings.weight
    for expected, kwargs in ((train_demo.EMBED_STD, {}), (0.3, {"embed_std": 0.3})):
        train_demo.initialize(model, seed=0, **kwargs)
        assert model.lm_head.weight is embeddings
        assert abs(float(embeddings.detach().std()) - expected) < 0.05 * expected
        assert abs(float(model.backbone.layers[1].mixer.q_proj.weight.detach().std()) - 0.02
                   ) < 0.002


@pytest.mark.parametrize("flag, value, allowed", [
    ("--steps", "0", ">= 1"), ("--code-batch", "0", ">= 1"), ("--threads", "0", ">= 1"),
    ("--echo-batch", "-1", ">= 0"), ("--warmup", "-2", ">= 0"), ("--lr", "0", "> 0"),
    ("--embed-std", "-0.1", "> 0"),
])
def test_bad_flags_name_the_flag_the_value_and_what_is_allowed(flag, value, allowed, tmp_path,
                                                               capsys):
    with pytest.raises(SystemExit) as stop:
        train_demo.parse_args(["--config", "smoke", "--out", str(tmp_path), flag, value])
    assert stop.value.code == 2
    assert f"{flag}: must be {allowed}, got {value}" in capsys.readouterr().err


def test_zero_echo_chats_is_allowed():
    args = train_demo.parse_args(["--out", "unused", "--echo-batch", "0"])
    assert args.echo_batch == 0


def test_precision_auto_takes_bf16_only_where_the_device_has_it_natively():
    cpu = torch.device("cpu")
    assert train_demo.autocast_dtype(cpu, "auto", cpu_bf16=True) == torch.bfloat16
    assert train_demo.autocast_dtype(cpu, "auto", cpu_bf16=False) == torch.float32
    assert train_demo.autocast_dtype(cpu, "auto") == (
        torch.bfloat16 if train_demo.cpu_has_native_bf16() else torch.float32)
    # An explicit choice is taken as given, whatever the CPU.
    assert train_demo.autocast_dtype(cpu, "bf16", cpu_bf16=False) == torch.bfloat16
    assert train_demo.autocast_dtype(cpu, "fp32", cpu_bf16=True) == torch.float32
    with pytest.raises(ValueError, match="precision: 'fp16' is not one of auto, bf16, fp32"):
        train_demo.autocast_dtype(cpu, "fp16")


def test_bad_precision_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_demo.parse_args(["--out", str(tmp_path), "--precision", "fp16"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "'fp16'" in err and "'auto', 'bf16', 'fp32'" in err


def _history(record: dict) -> list[dict]:
    keys = ("code", "chat", "echo", "code_mtp1", "grad_norm", "expert_load_max")
    return [{k: h[k] for k in keys} for h in record["history"]]


def test_minutes_sets_the_step_count_from_timed_steps_and_records_it(tmp_path, capsys):
    timed_end = train_demo.TIMED_STEPS.stop
    common = ["--config", "smoke", "--warmup", str(timed_end + 1), "--eval-every", "1000",
              "--seed", "3"]
    # Too short a budget for more: one step after the timed ones.
    short = train_demo.main(common + ["--steps", "60", "--minutes", "0.001",
                                      "--out", str(tmp_path / "short")])
    assert short["steps"] == timed_end + 1 == len(short["history"])
    assert short["recipe"]["steps"] == timed_end + 1 and short["minutes"] == 0.001
    saved = json.loads((tmp_path / "short" / "training.json").read_text())
    assert saved["steps"] == timed_end + 1 and saved["minutes"] == 0.001
    err = capsys.readouterr().err
    assert f"repeat the run with --steps {timed_end + 1}" in err
    # A long budget stops at the ceiling (--steps).
    long = train_demo.main(common + ["--steps", str(timed_end + 4), "--minutes", "600",
                                     "--out", str(tmp_path / "long")])
    assert long["steps"] == timed_end + 4 == len(long["history"])
    # The recorded count repeats the run: the timed steps' learning rates are the warmup's.
    again = train_demo.main(common + ["--steps", str(timed_end + 1),
                                      "--out", str(tmp_path / "again")])
    assert _history(again) == _history(short)


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "0"], "--minutes: must be > 0, got 0.0"),
    (["--minutes", "5", "--warmup", "10"], "--minutes: needs a warmup of more than 25 steps"),
    (["--minutes", "5", "--warmup", "40", "--steps", "20"],
     "--minutes: needs a ceiling of more than 25 steps (--steps or the recipe's), got 20"),
    (["--device", "tpu"], "--device: 'tpu': allowed: cpu, cuda, cuda:N"),
    (["--device", "gpu0"], "--device: 'gpu0': allowed: cpu, cuda, cuda:N"),
    (["--device", "xla"], "--device: 'xla': allowed: cpu, cuda, cuda:N"),
])
def test_bad_budget_and_device_flags_are_refused_clearly(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_demo.parse_args(["--config", "smoke", "--out", str(tmp_path), *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_demo.parse_args(["--config", "smoke", "--out", str(tmp_path), "--device", "cuda"])
    assert stop.value.code == 2
    assert "--device: 'cuda', but this torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_smoke_recipe_trains_on_cuda_and_matches_the_cpu_run(tmp_path):
    """The GPU path of the script end to end (routers' counts, evaluation and checkpoint on the
    device), fp32 so the first step compares with the CPU run's."""
    cuda = train_demo.main(["--config", "smoke", "--steps", "3", "--seed", "5", "--device",
                            "cuda", "--precision", "fp32", "--out", str(tmp_path / "cuda")])
    cpu = train_demo.main(["--config", "smoke", "--steps", "3", "--seed", "5",
                           "--precision", "fp32", "--out", str(tmp_path / "cpu")])
    assert cuda["device"] == "cuda" and len(cuda["evals"]) == 2
    first_cuda, first_cpu = cuda["history"][0], cpu["history"][0]
    for key in ("code", "chat", "echo", "code_mtp1", "code_mtp2"):
        assert first_cuda[key] == pytest.approx(first_cpu[key], rel=1e-3), key
    model = load_model(tmp_path / "cuda", dtype=torch.float32)
    assert set(model.layer_kinds) == {"mamba", "attention", "moe"}
