"""Kopf settings the operator depends on."""

from __future__ import annotations

import kopf

from baton.operator.handlers import TIMER_EXIT_POLL_SECONDS, configure_kopf


def test_a_deleted_model_is_not_held_a_minute_by_a_running_resync():
    """A Model deleted while its resync timer's (synchronous, uncancellable) reconcile runs
    keeps Kopf's finalizer until Kopf looks at the timer again: every
    cancellation_polling seconds, 60 by default. The operator looks every second."""
    settings = kopf.OperatorSettings()
    assert settings.background.cancellation_polling == 60  # Kopf's default, which this fixes
    configure_kopf(settings)
    assert settings.background.cancellation_polling == TIMER_EXIT_POLL_SECONDS <= 1.0
    assert settings.persistence.finalizer == "baton.dev/kopf-finalizer"
