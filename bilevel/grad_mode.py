"""Grad mode for the oracles' autograd calls, entered only when it is off.

The oracles differentiate with ``torch.autograd`` even when called under ``torch.no_grad()``,
so each call used to enter ``torch.enable_grad()``. Grad mode is almost always on already (a
method's step, an inner loop); entering and leaving the context manager then costs three
Python calls per oracle call, and an AID step of the peer benchmark makes a dozen such calls.
"""

from __future__ import annotations

import contextlib

import torch

_ALREADY_ON = contextlib.nullcontext()


def grad_enabled() -> contextlib.AbstractContextManager:
    """``torch.enable_grad()``, or a reusable no-op context when grad mode is already on."""
    return _ALREADY_ON if torch.is_grad_enabled() else torch.enable_grad()
