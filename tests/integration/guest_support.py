"""Shared checks for the tests that boot the real default guest."""

from __future__ import annotations

import os

import pytest

import guest_images

# Measured on a PVM host (guest kernel code interpreted): boot to the agent in 1.5–3.5
# minutes depending on host load. Generous, because a slow CI machine must not flake.
BOOT_TIMEOUT = 420.0
REBOOT_TIMEOUT = 420.0


def require_guest() -> pytest.MarkDecorator:
    """Skip only for a checked, stated reason: no usable /dev/kvm, or no built guest."""
    reason = ""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "/dev/kvm is missing or not accessible to this user"
    elif not guest_images.is_built(guest_images.default_image()):
        reason = "the default guest is not built: run `make guest` (make test does)"
    return pytest.mark.skipif(bool(reason), reason=reason)
