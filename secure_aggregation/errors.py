"""Errors raised by secure aggregation, as one-line fedcare errors (what, where, what to do)."""

from __future__ import annotations

from fedcare.errors import FedcareError


class SecAggError(FedcareError):
    """A secure-aggregation step cannot go on (bad input, protocol violation, refusal)."""


class TamperingDetected(SecAggError):
    """A ciphertext or share failed authentication or does not match what it claims to be."""

    blame: list[int]  # set only where a dealer's shares do not rebuild its secret: that node (server_half.py)


class TooFewSurvivors(SecAggError):
    """Fewer nodes than the threshold are left; the round cannot be unmasked (nothing revealed)."""


class ClipRangeError(SecAggError):
    """An update has values the fixed-point encoding cannot represent without wrapping."""


class ShamirError(SecAggError):
    """Shamir shares are too few, malformed or inconsistent."""
