"""The replica profile: interpolation of decode step times and parsing errors."""

from __future__ import annotations

import json

import pytest

from baton.operator.autoscaler.profile import DEFAULT_PROFILE, ReplicaProfile, load_profile

PROFILE = ReplicaProfile.from_dict({"prefill_tokens_per_second": 8000,
                                    "decode_step_seconds": {"8": 0.02, "1": 0.01, "32": 0.05},
                                    "max_decode_batch": 40})


def test_decode_step_interpolates_and_scales_with_speed():
    assert PROFILE.decode_step_seconds == ((1, 0.01), (8, 0.02), (32, 0.05))
    assert PROFILE.decode_step(1) == pytest.approx(0.01)
    assert PROFILE.decode_step(4.5) == pytest.approx(0.015)      # halfway 1..8
    assert PROFILE.decode_step(20) == pytest.approx(0.035)       # halfway 8..32
    assert PROFILE.decode_step(40) == pytest.approx(0.06)        # last slope extended
    assert PROFILE.decode_step(0) == pytest.approx(0.01)         # never below one sequence
    assert PROFILE.decode_step(20, relative_speed=2.5) == pytest.approx(0.035 / 2.5)


def test_decode_batch_limits():
    assert PROFILE.decode_batch_limit() == 40
    assert PROFILE.decode_batch_limit(2.5) == 100
    assert PROFILE.decode_batch_limit(2.5, max_concurrency=64) == 64
    # the largest batch within the step limit, by brute force
    for limit, speed in ((0.03, 1.0), (0.035, 1.0), (0.03, 2.0), (0.009, 1.0)):
        expected = max([b for b in range(1, PROFILE.decode_batch_limit(speed) + 1)
                        if PROFILE.decode_step(b, speed) <= limit], default=0)
        assert PROFILE.decode_batch_within(limit, speed) == expected


def test_round_trip_and_default_is_valid(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**PROFILE.to_dict(), "source": "a note"}))
    assert load_profile(path) == PROFILE
    assert load_profile(None) is DEFAULT_PROFILE
    assert ReplicaProfile.from_dict(DEFAULT_PROFILE.to_dict()) == DEFAULT_PROFILE


@pytest.mark.parametrize("obj, message", [
    ({"decode_step_seconds": {"1": 0.01}, "max_decode_batch": 8}, "prefill_tokens_per_second"),
    ({"prefill_tokens_per_second": 0, "decode_step_seconds": {"1": 0.01},
      "max_decode_batch": 8}, "prefill_tokens_per_second must be a finite number > 0"),
    ({"prefill_tokens_per_second": 1, "decode_step_seconds": {"a": 0.01},
      "max_decode_batch": 8}, "decode_step_seconds"),
    ({"prefill_tokens_per_second": 1, "decode_step_seconds": {"1": 0.02, "8": 0.01},
      "max_decode_batch": 8}, "must not decrease"),
    ({"prefill_tokens_per_second": 1, "decode_step_seconds": {},
      "max_decode_batch": 8}, "at least one batch size"),
    ({"prefill_tokens_per_second": 1, "decode_step_seconds": {"1": 0.01},
      "max_decode_batch": 0}, "max_decode_batch"),
    ({"prefill_tokens_per_second": 1, "decode_step_seconds": {"1": 0.01},
      "max_decode_batch": 2.5}, "max_decode_batch must be an integer"),
])
def test_bad_profiles_are_rejected_with_the_field(obj, message):
    with pytest.raises(ValueError, match=message):
        ReplicaProfile.from_dict(obj)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_profile(path)
