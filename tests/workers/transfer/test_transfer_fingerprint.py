"""model_fingerprint tells checkpoints, configs and state settings apart."""

from __future__ import annotations

import json

import pytest

from baton.workers.transfer import fingerprint as fp


def _checkpoint(path, config: dict, weights: bytes) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(weights)


def test_fingerprint_follows_weights_config_and_settings(tmp_path):
    _checkpoint(tmp_path / "a", {"hidden_size": 8}, b"\x00" * 1000)
    _checkpoint(tmp_path / "b", {"hidden_size": 8}, b"\x00" * 999 + b"\x01")
    _checkpoint(tmp_path / "c", {"hidden_size": 16}, b"\x00" * 1000)
    _checkpoint(tmp_path / "a2", {"hidden_size": 8}, b"\x00" * 1000)
    settings = {"ssm_dtype": "float32"}
    a = fp.model_fingerprint(tmp_path / "a", settings)
    assert a == fp.model_fingerprint(tmp_path / "a2", settings)
    assert len(a) == 64
    assert a != fp.model_fingerprint(tmp_path / "b", settings)
    assert a != fp.model_fingerprint(tmp_path / "c", settings)
    assert a != fp.model_fingerprint(tmp_path / "a", {"ssm_dtype": "bfloat16"})


def test_large_shards_are_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(fp, "SAMPLE_BYTES", 100)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    body = len(header).to_bytes(8, "little") + header.encode()
    _checkpoint(tmp_path / "a", {}, body + b"\x00" * 4000)
    _checkpoint(tmp_path / "b", {}, body + b"\x00" * 3999 + b"\x02")
    assert fp.model_fingerprint(tmp_path / "a", {}) != fp.model_fingerprint(tmp_path / "b", {})


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        fp.model_fingerprint(tmp_path / "missing", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        fp.model_fingerprint(tmp_path / "empty", {})
