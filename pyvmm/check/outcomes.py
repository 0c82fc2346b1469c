"""How a scenario ends other than by passing: CheckFailed (the guest did not do what was
expected; the message says what was expected and what was seen) or ScenarioSkipped.

CheckFailed is an AssertionError, so a scenario run under pytest reads as a test failure.
"""

from __future__ import annotations

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class CheckFailed(AssertionError):
    """The guest or the device did not behave as the scenario expects."""


class ScenarioSkipped(Exception):
    """The scenario does not apply here (e.g. a device option it needs is absent)."""


class GuestGone(CheckFailed):
    """The VM process exited: no later scenario can run on it."""
