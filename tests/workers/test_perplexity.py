"""`baton perplexity`: the mean NLL of every token after each file's first, the same with any
window and stride as with one forward over the whole file; clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baton.workers import perplexity
from baton.workers.model import load_model
from baton.workers.text.tokenizer import load_tokenizer

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny"
TEXTS = ["The model reads a prompt one token at a time and writes an answer. " * 6,
         "Hello! How are you today? I am fine, thank you.\n" * 3]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(root / f"f{i}.txt")
        paths[-1].write_text(text)
    return paths


def reference(model, tokenizer) -> tuple[int, float]:
    """Each file in one forward, no windows."""
    count, total = 0, 0.0
    for text in TEXTS:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        total += float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    return count, total


def test_cli_prints_tokens_nll_ppl(files, capsys):
    assert perplexity.main(["--model", str(TINY), *map(str, files)]) == 0
    out = json.loads(capsys.readouterr().out)
    model = load_model(TINY, dtype=torch.float32)
    count, total = reference(model, load_tokenizer(TINY))
    assert set(out) == {"tokens", "nll", "ppl"} and out["tokens"] == count
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.parametrize("window, stride", [(16, 8), (16, 15), (9, 1), (40, 13)])
def test_windows_score_every_token_once(window, stride):
    model = load_model(TINY, dtype=torch.float32)
    ids = load_tokenizer(TINY).encode(TEXTS[0])
    assert len(ids) > 2 * window
    count, total = perplexity.window_nll(model, ids, window, stride)
    assert count == len(ids) - 1
    # Windowed scoring sees less context than one full forward, never a different count.
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    full = float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
    assert math.isfinite(total) and total == pytest.approx(full, rel=0.5)
    assert perplexity.window_nll(model, ids[:1], window, stride) == (0, 0.0)


def test_bad_input_is_named(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        perplexity.main(["--model", str(TINY), str(tmp_path / "missing.txt")])
    assert "missing.txt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        perplexity.main(["--model", str(TINY), "--window", "99999", str(files[0])])
    assert "--window: 99999 must be in [2, 4096]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        perplexity.main(["--model", str(TINY), "--window", "8", "--stride", "8",
                         str(files[0])])
    assert "--stride: 8 must be in [1, 7]" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("a")
    assert perplexity.main(["--model", str(TINY), str(one)]) == 2
    assert "no token to score" in capsys.readouterr().err
