"""fedcare's use of Opacus internals, verified on Opacus 1.6.0 (gate: ``opacus_verified``).

``client/dp_optimizer.py``'s ``ClippedSumDPOptimizer`` subclasses Opacus's
``DPOptimizerFastGradientClipping`` and batches its bookkeeping. For that it uses, from Opacus 1.6.0:

- the private helpers ``opacus.optimizers.optimizer._check_processed_flag`` and ``_mark_as_processed``
  (the "a gradient is used once" rule), here as ``check_processed_flag`` / ``mark_as_processed``;
- the optimizer's private state ``_is_last_step_skipped`` and ``_adjusted_noise_multiplier``
  (``last_step_skipped`` / ``noise_multiplier_in_use``), and the order in which ``pre_step`` calls
  ``accumulate``, ``add_noise`` and ``scale_grad``, which it overrides.

On another Opacus, ``public_dp_optimizer`` is the fallback (``client.dp_optimizer.make_dp_optimizer``
selects it, with ONE warning per process): Opacus's own public ``DPOptimizerFastGradientClipping``
step, its noise drawn with Opacus's ``secure_mode`` from a torch generator seeded by the hospital's
secret stream (so no seed the coordinator knows reproduces it); slower, the same update.
``ClippedSumDPOptimizer`` itself has no public equivalent: built on another Opacus it refuses
(``require_verified``, a FedcareError naming both versions). Contract tests: tests/test_compat.py.
"""

from __future__ import annotations

from fedcare.compat import installed_version, unverified_message, warn_once
from fedcare.errors import FedcareError

VERIFIED_OPACUS = "1.6.0"
FALLBACK = "DP-SGD uses Opacus's public optimizer step (noise via secure_mode from a secretly seeded generator)"


def opacus_version() -> str:
    """The installed Opacus's version, from its package metadata."""
    return installed_version("opacus")


def opacus_verified() -> bool:
    """Whether the installed Opacus is the verified one; otherwise one warning per process, and False."""
    found = opacus_version()
    if found == VERIFIED_OPACUS:
        return True
    warn_once("Opacus", unverified_message("Opacus", VERIFIED_OPACUS, found, FALLBACK))
    return False


def require_verified(what: str) -> None:
    """Refuse ``what`` (which has no public fallback) on any Opacus but the verified one."""
    found = opacus_version()
    if found != VERIFIED_OPACUS:
        raise FedcareError(
            f"{what} uses Opacus internals verified on Opacus {VERIFIED_OPACUS}, this is Opacus {found}",
            f"install opacus=={VERIFIED_OPACUS} (the version fedcare pins), or build the optimizer "
            "with client.dp_optimizer.make_dp_optimizer (Opacus's public step on other versions)",
        )


def check_processed_flag(tensor) -> None:
    """Opacus's check that a gradient was not used by an earlier step (raises ValueError if it was)."""
    from opacus.optimizers.optimizer import _check_processed_flag

    _check_processed_flag(tensor)


def mark_as_processed(tensor) -> None:
    """Opacus's mark: this gradient was used by a step."""
    from opacus.optimizers.optimizer import _mark_as_processed

    _mark_as_processed(tensor)


def last_step_skipped(optimizer) -> bool:
    """Whether the optimizer's last step was skipped (gradient accumulation): Opacus keeps the summed gradients then."""
    return optimizer._is_last_step_skipped


def noise_multiplier_in_use(optimizer) -> float:
    """The noise multiplier this step uses (Opacus's adjusted one where it keeps one)."""
    return getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)


def public_dp_optimizer(optimizer, *, noise, **kwargs):
    """Opacus's public ``DPOptimizerFastGradientClipping`` for pre-clipped gradient sums, noise from ``noise``.

    ``noise`` (a ``client.secret_randomness.SecretRandom``) seeds the torch generator Opacus draws from,
    with ``secure_mode`` (Opacus's floating-point-attack mitigation). ``kwargs``: Opacus's arguments.
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping

    return DPOptimizerFastGradientClipping(optimizer, generator=noise.torch_generator(), secure_mode=True, **kwargs)
