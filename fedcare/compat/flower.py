"""fedcare's hooks into Flower internals, verified on Flower 1.41.0 (gate: ``flower_verified``).

Flower 1.41's fixed waits dominate a small deployment round, and fedcare shortens them.
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
and only on the Flower version this was written against. Loopback and cross-silo WAN messages alike
are small next to 1 s; the backoff still doubles up to Flower's 10 s cap, so a slow upload is not
polled harder than Flower would after a few tries.

The same gate holds fedcare's other hooks into Flower internals, so they live in one place:
``guard_fab_install`` (a hospital's FAB check, run in the ClientApp process after the task's FAB
is pulled and before it is installed or imported), ``build_fab`` (Flower's own FAB build, for
``fedcare deploy fab``) and the ClientApp runtime calls of fedcare's ClientApp executor
(``fedcare/warm_clientapp.py``: ``clientapp_task_acquirer``, ``run_clientapp_task``,
``time_clientapp_steps``, ``exit_with_parent``; gate: ``executor_supported``).

On any other Flower (its version as Flower reads it from its package metadata,
``flwr.supercore.version.package_version``) the hooks change nothing and Flower's public behaviour
runs: its timing, its FAB install, its own executor with a fresh ``flwr-clientapp`` per message
instead of the warm one (``fedcare/node_launcher.py``), its FAB build; ONE warning per process says
so. The FAB guard is a security control with no public fallback: on another Flower it is not
installed, and its callers then run no ClientApp at all (the node does not start).
Contract tests for every hook: tests/test_compat.py.

Stdlib-only at import time: the warm ClientApp executor imports this before it forks.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from fedcare.compat import unverified_message, warn_once

PATCHED_FLOWER = "1.41.0"
FLOWER_IDLE_POLL_S = 3.0  # start_client_internal: time.sleep(3) when no message was pulled
FLOWER_REPLY_POLL_S = 0.5  # start_client_internal: time.sleep(0.5) while waiting for the reply / its objects
REPLY_POLL_S = 0.02
ACTIVE_WINDOW_S = 120.0  # a node that got a message this recently polls fast
PULL_INITIAL_BACKOFF_S = 0.02


def flower_version() -> str:
    """The installed Flower's version (read at call time)."""
    from flwr.supercore import version

    return str(version.package_version)


UNVERIFIED_FALLBACK = (
    "fedcare keeps Flower's own behaviour: its polling and object-pull timing, its FAB install, "
    "its own executor with a fresh ClientApp process per message (no warm executor), its FAB "
    "build; FAB approval cannot be hooked, so a node with approval on does not start"
)


def flower_verified() -> bool:
    """Whether fedcare's Flower hooks may be used: the installed Flower is the verified one.

    Otherwise warns once per process (``UNVERIFIED_FALLBACK``) and returns False."""
    found = flower_version()
    if found == PATCHED_FLOWER:
        return True
    warn_once("Flower", unverified_message("Flower", PATCHED_FLOWER, found, UNVERIFIED_FALLBACK), logger="flwr")
    return False


def shorten_object_pull_backoff(initial_s: float = PULL_INITIAL_BACKOFF_S) -> bool:
    """Retry a not-yet-uploaded object after ``initial_s`` (doubling to Flower's cap), not after 1 s."""
    if not flower_verified():
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
    if not flower_verified():
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
    if not flower_verified():
        return False
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        return False
    clock = _PromptClock(poll_s)
    if not on_message_stored(clock.message_stored):
        return False
    loop.time = clock  # type: ignore[assignment]  # Flower's module-level clock, replaced on purpose
    return True


def reuse_installed_fab() -> bool:
    """ClientApp: skip re-extracting a FAB that is already installed (Flower then keeps the installed copy anyway).

    Flower 1.41's ``run_clientapp`` calls ``install_from_fab`` for every message: it unzips the FAB
    into a temporary folder and hashes every file, then finds the app already installed under
    ``$FLWR_HOME/apps/<publisher>.<app>.<version>.<hash[:8]>`` and returns that folder unchanged.
    This returns the same folder without the unzip when it exists.
    """
    if not flower_verified():
        return False
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as runtime

    guard = runtime.install_from_fab if isinstance(runtime.install_from_fab, _FabGuard) else None
    install = guard.install if guard is not None else runtime.install_from_fab

    def install_unless_installed(fab_file, install_dir=None, skip_prompt=False):
        if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
            digest = hashlib.sha256(fab_file).hexdigest()[:FAB_HASH_TRUNCATION]
            found = [p for p in (get_flwr_home() / APP_DIR).glob(f"*.{digest}") if (p / "pyproject.toml").is_file()]
            if len(found) == 1:
                return found[0]
        return install(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)

    if guard is not None:
        guard.install = install_unless_installed  # the FAB check stays in front of the shortcut
    else:
        runtime.install_from_fab = install_unless_installed
    return True


FAB_GUARD_REFUSAL = (
    "fedcare's FAB approval is written for Flower {wanted}, this is Flower {found}: "
    "this node runs no ClientApp rather than unchecked code"
)


def fab_guard_supported() -> bool:
    """Whether ``guard_fab_install`` can hook this Flower (the pinned version, with the expected functions)."""
    if flower_version() != PATCHED_FLOWER:
        return False
    from flwr.supernode.runtime import run_clientapp as runtime

    return all(
        callable(getattr(runtime, name, None)) for name in ("pull_task_input", "install_from_fab", "run_clientapp")
    )


class _FabGuard:
    """Stands in for ``install_from_fab`` in Flower's ClientApp runtime: check first, then install.

    ``run_clientapp`` calls ``pull_task_input`` (message, context, run, FAB bytes), then
    ``install_from_fab(fab.content)``, then imports the app from the installed folder; an exception
    raised here is turned by Flower into an Error reply to the ServerApp (with its text as the reason)
    and nothing is installed or imported. The run's fab_id/fab_version/fab_hash come from the pull (a
    wrapped ``pull_task_input``), because Flower loads the app from the folder they name.
    """

    def __init__(self, check, install, pull) -> None:
        self.check, self.install, self.pull = check, install, pull
        self.task = None

    def pull_and_remember(self, client):
        self.task = None
        message, context, run, fab = self.pull(client)
        self.task = (run, fab)
        return message, context, run, fab

    def __call__(self, fab_file, install_dir=None, skip_prompt=False):
        from logging import ERROR

        from flwr.supercore import log

        task, self.task = self.task, None
        digest = hashlib.sha256(fab_file).hexdigest() if isinstance(fab_file, bytes) else "?"
        try:
            if task is None or not isinstance(fab_file, bytes) or task[1].content is not fab_file:
                raise RuntimeError(
                    f"refused to install FAB sha256:{digest} outside a pulled ClientApp task: "
                    "only Flower's run_clientapp installs FABs on this node"
                )
            run, fab = task
            self.check(fab_file, claimed_digest=fab.hash_str, app_id=run.fab_id, app_version=run.fab_version)
        except Exception as exc:
            log(ERROR, "fedcare: refused FAB sha256:%s: %s", digest, exc)
            raise
        return self.install(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)


def guard_fab_install(check) -> bool:
    """ClientApp process: run ``check(fab_bytes, claimed_digest=, app_id=, app_version=)`` before any FAB install.

    ``check`` raises to refuse (e.g. ``fedcare.fab_approval.FabPolicy.check``). Installed in front of
    ``reuse_installed_fab``'s shortcut whatever the order of the two calls; a second call replaces the
    check. Returns False, hooking nothing, on any Flower but the pinned one: the caller must then run
    no ClientApp (``FAB_GUARD_REFUSAL``).
    """
    if not flower_verified() or not fab_guard_supported():
        return False
    from flwr.supernode.runtime import run_clientapp as runtime

    current = runtime.install_from_fab
    if isinstance(current, _FabGuard):
        current.check = check
        return True
    guard = _FabGuard(check, current, runtime.pull_task_input)
    runtime.pull_task_input = guard.pull_and_remember
    runtime.install_from_fab = guard
    return True


def build_fab(app_dir: Path) -> tuple[bytes, str | None]:
    """The FAB ``flwr run APP_DIR`` ships, built by Flower's own function; and a note, or None.

    When Flower's build stops on a path nested deeper than it allows (it checks every *.py, *.toml,
    *.json, ... in the tree that the root .gitignore does not exclude, before applying ``fab-include``:
    e.g. a deploy/flwr-home/apps tree of installed FABs), the FAB is built by the same function from
    the files ``fab-include`` selects (plus pyproject.toml and .gitignore), which gives the bytes Flower
    would build once that tree is excluded; the note then says `flwr run` itself will stop there.
    """
    flower_verified()  # another Flower: a warning, then this Flower's own build function
    import tomllib

    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.utils import AppPathDepthError, build_pathspec, collect_files

    app_dir = Path(app_dir).expanduser().resolve()
    try:
        return build_fab_from_disk(app_dir), None
    except AppPathDepthError as exc:
        config = tomllib.loads((app_dir / "pyproject.toml").read_text())
        include = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
        if not include:
            raise
        spec = build_pathspec(include)
        files = {
            path: file
            for path, file in collect_files(app_dir).items()
            if path in ("pyproject.toml", ".gitignore") or spec.match_file(path)
        }
        return build_fab_from_files(files)[0], str(exc)


def executor_supported() -> bool:
    """Whether fedcare's ClientApp executor (``fedcare/warm_clientapp.py``, warm or ``--cold``) can run here.

    It stands in for ``flower-superexec``: Flower's Runtime API protobufs and HTTP client, and
    ``run_clientapp``'s signature, are those of the verified Flower. On another Flower it would fail
    every task (and be restarted, while messages wait out the exchange timeout), so the node uses
    Flower's own executor instead; the one warning of ``flower_verified`` says so.
    """
    return flower_verified() and fab_guard_supported()


def exit_with_parent(parent_pid: int) -> None:
    """Flower's parent-process monitor: SIGINT to this process when ``parent_pid`` exits."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)


def clientapp_task_acquirer(runtime_api_address: str):
    """flower-superexec's ``AcquireTask`` on a SuperNode's Runtime API (loopback, insecure), for ClientApp tasks.

    Returns ``(acquire, unreachable)``: ``acquire()`` returns Flower's response (``HasField("task")``,
    ``token``, ``task.task_id``, ``task.run_id``); it raises ``unreachable`` while the Runtime API is not up.
    """
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    return (lambda: client.AcquireTask(request)), httpx.TransportError


def run_clientapp_task(runtime_api_address: str, token: str, parent_pid: int) -> None:
    """Run one task exactly as `flwr-clientapp --token` does (Flower's ``run_clientapp``; it ends with SystemExit)."""
    from flwr.supernode.runtime import run_clientapp as runtime

    runtime.run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=True,
        certificates=None,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def time_clientapp_steps(trace) -> None:
    """Benchmark aid: time Flower's own steps of one task (task input, FAB install, app load) with
    ``trace("clientapp-step", step=NAME, start=T)``."""
    from flwr.supernode.runtime import run_clientapp as runtime

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                trace("clientapp-step", step=name, start=started)

        return wrapper

    runtime.pull_task_input = timed("pull-task-input", runtime.pull_task_input)
    runtime.install_from_fab = timed("install-fab", runtime.install_from_fab)
    load = runtime.get_load_client_app_fn

    def get_load(*args, **kwargs):
        return timed("load-app", load(*args, **kwargs))

    runtime.get_load_client_app_fn = get_load
    runtime.push_message = timed("push-reply", runtime.push_message)
    runtime.push_task_output = timed("push-task-output", runtime.push_task_output)
