"""Flower 1.41's fixed waits that dominate a small deployment round, and fedcare's shorter ones.

Flower 1.41.0 has no flag or environment variable for these (measured in
bench/bench_deployment_overhead.py; see docs/benchmarks.md):

- the SuperNode asks the SuperLink for a new message every 3 s (``time.sleep(3)`` in
  ``flwr.supernode.start_client_internal``) and checks for its ClientApp's reply every 0.5 s;
- an object pull that finds an object not yet uploaded retries after 1 s, then 2 s, 4 s ...
  (``PULL_INITIAL_BACKOFF``, the default of ``pull_objects`` / ``pull_and_inflate_object_from_tree``).
  Every message is pushed as "message, then its objects", so a reader that is quick (a node that
  polls often, a ClientApp started at once, a ServerApp that polls often) meets a not-yet-uploaded
  object and sleeps a whole second for a message of a few kilobytes.

Both are changed here by replacing a default in one Flower module, in the calling process only,
and only on the Flower version this was written against; on any other version the functions
warn once and change nothing. Loopback and cross-silo WAN messages alike are small next to 1 s;
the backoff still doubles up to Flower's 10 s cap, so a slow upload is not polled harder than
Flower would after a few tries.

Stdlib-only at import time: the warm ClientApp executor imports this before it forks.
"""

from __future__ import annotations

import time

PATCHED_FLOWER = "1.41.0"
FLOWER_IDLE_POLL_S = 3.0      # start_client_internal: time.sleep(3) when no message was pulled
FLOWER_REPLY_POLL_S = 0.5     # start_client_internal: time.sleep(0.5) while waiting for the reply / its objects
REPLY_POLL_S = 0.02
ACTIVE_WINDOW_S = 120.0       # a node that got a message this recently polls fast
PULL_INITIAL_BACKOFF_S = 0.02


def _flower_version_ok(what: str) -> bool:
    from flwr.supercore.version import package_version

    if package_version == PATCHED_FLOWER:
        return True
    from logging import WARNING

    from flwr.supercore import log

    log(WARNING, "fedcare: %s is written for Flower %s, this is %s: keeping Flower's timing",
        what, PATCHED_FLOWER, package_version)
    return False


def shorten_object_pull_backoff(initial_s: float = PULL_INITIAL_BACKOFF_S) -> bool:
    """Retry a not-yet-uploaded object after ``initial_s`` (doubling to Flower's cap), not after 1 s."""
    if not _flower_version_ok("the object-pull backoff"):
        return False
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        if not defaults or "initial_backoff" not in defaults:
            return False
        defaults["initial_backoff"] = initial_s
    return True


class _PromptClock:
    """Stands in for `time` inside flwr.supernode.start_client_internal: shorter waits while a run is active.

    After each message the node polls again after ``FIRST_POLL_S``, then 1.5x longer each time up
    to ``poll_s``: the node whose reply completes an exchange gets the next message within tens of
    milliseconds, while nodes that wait for slower hospitals do not keep the SuperLink busy (every
    poll is a TLS request with a node signature: ~10-15 ms of SuperLink CPU on a 2-core machine).
    """

    FIRST_POLL_S = 0.05

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self.last_message = float("-inf")
        self.next_poll_s = poll_s

    def message_stored(self) -> None:
        self.last_message = time.monotonic()
        self.next_poll_s = min(self.FIRST_POLL_S, self.poll_s)

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_POLL_S and time.monotonic() - self.last_message < ACTIVE_WINDOW_S:
            seconds = self.next_poll_s
            self.next_poll_s = min(self.poll_s, self.next_poll_s * 1.5)
        elif seconds == FLOWER_REPLY_POLL_S:
            seconds = REPLY_POLL_S
        time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def on_message_stored(callback) -> bool:
    """SuperNode: call ``callback()`` each time a message (and all its objects) has been stored."""
    if not _flower_version_ok("the SuperNode message hook"):
        return False
    from flwr.supernode import start_client_internal as loop

    pull = getattr(loop, "_pull_and_store_message", None)
    if pull is None:
        return False

    def pull_and_notify(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            callback()
        return run_id

    loop._pull_and_store_message = pull_and_notify
    return True


def patch_supernode_polling(poll_s: float) -> bool:
    """SuperNode: poll within 50 ms..``poll_s`` while a run is active (3 s when idle), check replies every 20 ms."""
    if not _flower_version_ok("--poll-interval"):
        return False
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        return False
    clock = _PromptClock(poll_s)
    if not on_message_stored(clock.message_stored):
        return False
    loop.time = clock
    return True


def reuse_installed_fab() -> bool:
    """ClientApp: skip re-extracting a FAB that is already installed (Flower then keeps the installed copy anyway).

    Flower 1.41's ``run_clientapp`` calls ``install_from_fab`` for every message: it unzips the FAB
    into a temporary folder and hashes every file, then finds the app already installed under
    ``$FLWR_HOME/apps/<publisher>.<app>.<version>.<hash[:8]>`` and returns that folder unchanged.
    This returns the same folder without the unzip when it exists.
    """
    if not _flower_version_ok("the FAB install shortcut"):
        return False
    import hashlib

    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as runtime

    install = runtime.install_from_fab

    def install_unless_installed(fab_file, install_dir=None, skip_prompt=False):
        if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
            digest = hashlib.sha256(fab_file).hexdigest()[:FAB_HASH_TRUNCATION]
            found = [p for p in (get_flwr_home() / APP_DIR).glob(f"*.{digest}") if (p / "pyproject.toml").is_file()]
            if len(found) == 1:
                return found[0]
        return install(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)

    runtime.install_from_fab = install_unless_installed
    return True

