"""fedcare's uses of other projects' private APIs, one module per project, each gated on a verified version.

- ``fedcare.compat.flower``: Flower internals (SuperNode polling, object-pull backoff, the ClientApp
  runtime behind the warm executor and the FAB approval check, Flower's FAB build), verified on
  Flower 1.41.0;
- ``fedcare.compat.opacus``: Opacus's private optimizer helpers behind ``client/dp_optimizer.py``,
  verified on Opacus 1.6.0;
- ``fedcare.compat.torch``: autograd engine internals and reference counts behind
  ``client/per_sample_clipping.py``, verified on torch 2.13.x.

Each module's gate compares the installed version (read with ``importlib.metadata``) with the
verified one. On any other version fedcare uses the public behaviour instead and says so with
ONE warning per project and process (``warn_once``); where no public behaviour exists the gate
refuses with a ``FedcareError`` naming both versions. ``tests/test_compat.py`` holds a contract
test per private use, so an upgrade fails there loudly before it misbehaves in a deployment.

Stdlib-only at import time: the warm ClientApp executor imports ``fedcare.compat.flower`` before it forks.
"""

from __future__ import annotations

import importlib.metadata
import logging

_warned: set[str] = set()


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (e.g. "opacus"), from its package metadata."""
    return importlib.metadata.version(distribution)


def warn_once(project: str, message: str, logger: str = "fedcare") -> bool:
    """Log ``message`` as a WARNING on ``logger`` the first time ``project`` is reported in this process.

    Returns whether it was logged now (False: this process already warned about ``project``).
    """
    if project in _warned:
        return False
    _warned.add(project)
    logging.getLogger(logger).warning(message)
    return True


def unverified_message(project: str, verified: str, found: str, fallback: str) -> str:
    """The one warning for ``project`` found at version ``found`` where fedcare verified ``verified``."""
    return (
        f"fedcare: its use of {project} internals is verified on {project} {verified}, this is {project} "
        f"{found}: {fallback}"
    )
