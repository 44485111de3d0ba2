"""The test suite itself: no test can hang (pytest-timeout with a default; slow tests get longer)."""

from __future__ import annotations

import pytest

SLOW_TIMEOUT_S = 1200  # as in tests/conftest.py


def test_every_test_has_a_timeout(request):
    assert float(request.config.getini("timeout")) == 600
    assert request.config.pluginmanager.hasplugin("timeout")


@pytest.mark.slow
def test_slow_tests_get_a_longer_timeout(request):
    assert request.node.get_closest_marker("timeout").args == (SLOW_TIMEOUT_S,)
