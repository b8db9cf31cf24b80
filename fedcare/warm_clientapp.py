"""A warm ClientApp executor for `flower-supernode --isolation process` (one per SuperNode).

Flower 1.41 runs every message a node receives in a fresh `flwr-clientapp` process that Flower's
`flower-superexec` starts with `subprocess.Popen`: the interpreter starts, imports Flower's
runtime, and the ClientApp imports torch, opacus, pandas and scikit-learn, for every message
(train, evaluate, each secure-aggregation exchange). On a 2-core machine that is 5-15 s a
message. Flower has no process reuse for ClientApps in 1.41 (`flwr-clientapp` runs one task and
exits; its warm executor pools exist only for the Kubernetes executor and other task types).

This executor takes the place of `flower-superexec` (Flower's documented `--isolation process`
mode: the node runs no executor of its own) and keeps Flower's isolation: one process per
message, running Flower's own `run_clientapp` with the task's token, exactly as `flwr-clientapp
--token` would. The difference is how that process starts: it is forked from this process, which
imported the heavy third-party libraries once, instead of exec'd from scratch.

- Only third-party modules stay loaded in the parent. The ClientApp's own code (fedcare, client,
  server, ... packages) is purged from `sys.modules` before forking, so every message imports the
  app from the FAB Flower installed for the run, as a fresh `flwr-clientapp` would.
- The parent only imports: it runs no torch operation and never touches CUDA, so no torch thread
  pool or device context is inherited (OpenBLAS, started by the NumPy import, stops its threads
  at fork and restarts them in the child). The child reseeds NumPy's global generator like a
  fresh interpreter; Python's `random` reseeds itself after fork.
- Flower's object-pull backoff (1 s before retrying an object that is not stored yet) starts at
  20 ms in the children (fedcare.compat.flower).
- The parent asks the SuperNode's Runtime API (loopback) for pending ClientApp tasks
  (`AcquireTask`, as flower-superexec does) as soon as the node says it stored a message (a pipe
  from `fedcare.node_launcher`), and every 10 s regardless (a safety net); started on its
  own (no pipe), it polls every 50 ms.
- It reuses the FAB Flower already installed for the run instead of unzipping it per message.
- It runs only FABs this hospital approved (fedcare.fab_approval): every task's FAB is checked,
  after its bytes are pulled and before it is installed or any of its code imported, by code that
  the executor loaded from this node's own fedcare before any FAB existed. A refused task gets
  Flower's Error reply naming the digest and the approving command. With no approval store and no
  approved digest every FAB is refused; only `--allow-any-fab` (unsafe) turns the check off.
- `--cold` keeps the same checked path but starts a fresh interpreter per task (`--run-task`, the
  task's token on its stdin) instead of forking a warm one: for nodes with `warm-clientapp = false`,
  so that approval holds there too (Flower's own executor cannot be hooked).

Every call into Flower's ClientApp runtime (the Runtime API client, `run_clientapp`, its steps) is
in `fedcare.compat.flower`, verified on Flower 1.41.0: on another Flower the node launcher does not
start this executor and runs Flower's own (`fedcare.compat.flower.executor_supported`).

Run by `python -m fedcare.node_launcher` (which `fedcare node start` uses); stops when its
SuperNode (`--parent-pid`) exits.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from logging import DEBUG, ERROR, INFO, WARNING

# Bound here, before any purge of the project's modules: a task never re-imports this node's fedcare.
from fedcare.compat import flower as flower_compat
from fedcare.project_packages import PACKAGES

# The packages of this project: never kept loaded across forks (the FAB's copy must be used).
PROJECT_PACKAGES = (*PACKAGES, "bench", "tests")
# Imported once in the parent for their third-party dependencies (torch, opacus, pandas, sklearn,
# scipy, cryptography, pydicom, ...), then purged.
APP_MODULES = (
    "client.client_app",
    "client.privacy_ledger",
    "client.dp_trainer",
    "client.secure_update",
    "client.audit_trail",
    "client.feature_stats",
    "shared_models.registry",
    "shared_models.weights",
    "client.datasets.fed_heart_disease",
    "client.datasets.ehr_table",
    "client.datasets.ehr_events",
    "client.datasets.dicom_folder",
    "client.datasets.medmnist_npz",
)
FLOWER_MODULES = ("flwr.supernode.runtime.run_clientapp", "flwr.clientapp", "flwr.app")
# Imported lazily by the libraries on first use: torch.optim's first optimizer imports torch._dynamo
# (~1 s, measured), which would otherwise land in every training message's time.
LAZY_LIBRARY_MODULES = ("torch._dynamo",)
DEFAULT_POLL_S = 0.05  # without a wake pipe
IDLE_POLL_S = 10.0  # with one: a safety net only (a poll can meet a message still being stored)


def _is_project_module(name: str) -> bool:
    return name.partition(".")[0] in PROJECT_PACKAGES


def preload() -> tuple[int, list[str]]:
    """Import Flower's ClientApp runtime and the app's dependencies; drop the app's own modules."""
    import logging

    before = set(sys.modules)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    failed = []
    for name in FLOWER_MODULES + APP_MODULES + LAZY_LIBRARY_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional dataset dependency may be missing: the app says so later
            failed.append(f"{name} ({type(exc).__name__}: {exc})")
    # opacus calls logging.basicConfig on import; a fresh flwr-clientapp has no root handler until then
    root.handlers[:], root.level = handlers, level
    # A ClientApp that starts while its node is still storing the message would otherwise meet a
    # not-yet-stored object and sleep Flower's 1 s backoff (woken by the node, it rarely does).
    flower_compat.shorten_object_pull_backoff()
    flower_compat.reuse_installed_fab()
    for name in [n for n in sys.modules if _is_project_module(n)]:
        del sys.modules[name]
    gc.collect()
    gc.freeze()  # keep the preloaded objects out of the collector: their pages stay shared after fork
    return len(set(sys.modules) - before), failed


def _trace(event: str, **fields: object) -> None:
    """fedcare.timing.trace, inlined: this process must not import the project's packages."""
    path = os.environ.get("FEDCARE_TIMING_LOG")
    if path:
        import json

        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps({"ev": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n").encode())
        finally:
            os.close(fd)


def install_fab_check(policy) -> bool:
    """Put ``policy.check`` in front of every FAB install in this process (None: any FAB, unsafe).

    Returns False when this Flower cannot be hooked: the caller must then run no ClientApp.
    """
    return True if policy is None else flower_compat.guard_fab_install(policy.check)


def _run_task(runtime_api_address: str, token: str, parent_pid: int) -> int:
    """Run one task exactly as `flwr-clientapp --token` does (behind this process's FAB check); its exit status."""
    code = 1
    try:
        for name in [n for n in sys.modules if _is_project_module(n)]:
            del sys.modules[name]  # the app comes from the run's FAB, never from this node's install
        if os.environ.get("FEDCARE_TIMING_LOG"):
            flower_compat.time_clientapp_steps(_trace)
        flower_compat.run_clientapp_task(runtime_api_address, token, parent_pid)
        code = 0
    except SystemExit as exc:  # Flower ends every task with flwr_exit -> sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # report, never fall back into the parent's loop
        traceback.print_exc()
    return code


def _child(runtime_api_address: str, token: str, parent_pid: int, wake_fd: int | None) -> None:
    """In the forked process: run the task, then exit (never return into the parent's loop)."""
    code = 1
    try:
        if wake_fd is not None:
            os.close(wake_fd)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        import numpy as np

        np.random.seed(int.from_bytes(os.urandom(4), "little"))  # as a fresh interpreter would
        code = _run_task(runtime_api_address, token, parent_pid)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_one_task(runtime_api_address: str, parent_pid: int, policy) -> int:
    """`--run-task` (cold executor): a fresh interpreter runs one task, its token read from stdin."""
    from flwr.supercore import log

    token = sys.stdin.readline().strip()
    if not install_fab_check(policy):
        log(
            ERROR,
            "fedcare: "
            + flower_compat.FAB_GUARD_REFUSAL.format(
                wanted=flower_compat.PATCHED_FLOWER, found=flower_compat.flower_version()
            ),
        )
        return 1
    flower_compat.shorten_object_pull_backoff()
    flower_compat.reuse_installed_fab()
    return _run_task(runtime_api_address, token, parent_pid)


class _ColdTasks:
    """One fresh `python -m fedcare.warm_clientapp --run-task` per task, with this executor's FAB policy."""

    def __init__(self, runtime_api_address: str, policy_args: list[str]) -> None:
        self.command = [
            sys.executable,
            "-m",
            "fedcare.warm_clientapp",
            "--run-task",
            "--runtime-api-address",
            runtime_api_address,
            "--parent-pid",
            str(os.getpid()),
            *policy_args,
        ]
        self.running: list[subprocess.Popen] = []

    def start(self, token: str) -> None:
        proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write(token + "\n")  # not on the command line, where other local users could read it
        proc.stdin.close()
        self.running.append(proc)

    def reap(self) -> None:
        self.running = [p for p in self.running if p.poll() is None]


def serve(
    runtime_api_address: str,
    parent_pid: int | None,
    poll_s: float,
    wake_fd: int | None = None,
    policy=None,
    policy_args: list[str] | None = None,
    cold: bool = False,
) -> None:
    """Preload, then fork one process per ClientApp task until the SuperNode goes away.

    With ``wake_fd`` (a pipe the node writes to whenever it has stored a message), the executor
    asks for a task when woken and otherwise every ``IDLE_POLL_S``; without it, every ``poll_s``.
    Every task's FAB passes ``policy`` (None: any FAB) before it is installed. ``cold``: no preload,
    each task in a fresh interpreter given ``policy_args`` (the same policy).
    """
    if parent_pid is not None:
        flower_compat.exit_with_parent(parent_pid)  # SIGINT to us when the SuperNode exits
    checked, cold_tasks = _start_executor(runtime_api_address, policy, policy_args, cold)
    acquire_task, unreachable = flower_compat.clientapp_task_acquirer(runtime_api_address)
    children: set[int] = set()
    unreachable_since: float | None = None
    while True:
        _reap(children, cold_tasks)
        try:
            response = acquire_task()
            unreachable_since = None
        except unreachable:
            # the SuperNode's Runtime API is not up yet (or restarting)
            unreachable_since = _wait_unreachable(runtime_api_address, unreachable_since)
            continue
        if response.HasField("task") and response.token:
            _start_task(response, checked, cold_tasks, runtime_api_address, wake_fd, children)
            continue
        wake_fd = _wait_for_work(wake_fd, poll_s)


def _start_executor(
    runtime_api_address: str, policy, policy_args: list[str] | None, cold: bool
) -> tuple[bool, _ColdTasks | None]:
    """Install the FAB check and preload (warm), or prepare fresh processes (cold); log how tasks will run.

    Returns whether FABs can be checked as ``policy`` asks, and the cold task starter (None when warm).
    """
    from flwr.supercore import log

    started = time.monotonic()
    cold_tasks = None
    if cold:
        checked = policy is None or flower_compat.fab_guard_supported()
        cold_tasks = _ColdTasks(runtime_api_address, policy_args or [])
        log(INFO, "fedcare ClientApp executor (a fresh process per task): serving Runtime API %s", runtime_api_address)
    else:
        checked = install_fab_check(policy)  # before the preload purges fedcare's own modules
        count, failed = preload()
        log(
            INFO,
            "fedcare warm ClientApp executor: preloaded %d modules in %.1f s; serving Runtime API %s",
            count,
            time.monotonic() - started,
            runtime_api_address,
        )
        for problem in failed:
            log(DEBUG, "fedcare warm ClientApp executor: could not preload %s", problem)
    if policy is None:
        log(WARNING, "fedcare ClientApp executor: runs ANY FAB the SuperLink ships (--allow-any-fab)")
    else:
        log(INFO, "fedcare ClientApp executor: runs only approved, code-only FABs")
    return checked, cold_tasks


def _reap(children: set[int], cold_tasks: _ColdTasks | None) -> None:
    """Forget the task processes that have exited (forked children and cold processes)."""
    for pid in list(children):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
    if cold_tasks is not None:
        cold_tasks.reap()


def _wait_unreachable(runtime_api_address: str, unreachable_since: float | None) -> float:
    """Wait a moment for an unreachable Runtime API, warning every 120 s; when it became unreachable."""
    from flwr.supercore import log

    now = time.monotonic()
    unreachable_since = unreachable_since or now
    if now - unreachable_since > 120:
        log(WARNING, "fedcare warm ClientApp executor: Runtime API %s unreachable for 120 s", runtime_api_address)
        unreachable_since = now
    time.sleep(0.25)
    return unreachable_since


def _start_task(
    response,
    checked: bool,
    cold_tasks: _ColdTasks | None,
    runtime_api_address: str,
    wake_fd: int | None,
    children: set[int],
) -> None:
    """Run an acquired task: in a fresh process (cold) or a forked child (warm); refused if FABs cannot be checked."""
    from flwr.supercore import log

    _trace("executor-acquire", task=response.task.task_id)
    if not checked:
        log(
            ERROR,
            "fedcare: task %s of run %s not run: %s",
            response.task.task_id,
            response.task.run_id,
            flower_compat.FAB_GUARD_REFUSAL.format(
                wanted=flower_compat.PATCHED_FLOWER, found=flower_compat.flower_version()
            ),
        )
    elif cold_tasks is not None:
        cold_tasks.start(response.token)
    else:
        pid = os.fork()
        if pid == 0:
            _child(runtime_api_address, response.token, os.getppid(), wake_fd)
        children.add(pid)


def _wait_for_work(wake_fd: int | None, poll_s: float) -> int | None:
    """Wait for the node's wake-up (or the idle poll), else ``poll_s``; the wake pipe, None once the node closed it."""
    if wake_fd is None:
        time.sleep(poll_s)
    elif select.select([wake_fd], [], [], IDLE_POLL_S)[0] and not os.read(wake_fd, 4096):
        wake_fd = None  # the node closed the pipe (it is stopping): plain polling until we are stopped
    return wake_fd


def main(argv: list[str] | None = None) -> None:
    from fedcare.errors import FedcareError
    from fedcare.fab_approval import add_policy_arguments, policy_arguments, policy_from_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_S,
        help=f"seconds between AcquireTask polls without --wake-fd ({DEFAULT_POLL_S})",
    )
    parser.add_argument(
        "--wake-fd", type=int, default=None, help="a pipe the SuperNode writes to when it has stored a message"
    )
    parser.add_argument("--cold", action="store_true", help="a fresh interpreter per task instead of a warm fork")
    parser.add_argument("--run-task", action="store_true", help=argparse.SUPPRESS)  # one task, token on stdin
    add_policy_arguments(parser)
    args = parser.parse_args(argv)
    try:
        policy = policy_from_arguments(args)
    except FedcareError as exc:  # a bad digest or contradictory options
        parser.error(str(exc))
    if args.run_task:
        if args.parent_pid is None:
            parser.error("--run-task needs --parent-pid")
        code = run_one_task(args.runtime_api_address, args.parent_pid, policy)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    with contextlib.suppress(KeyboardInterrupt):  # the SuperNode stopped (parent monitor) or Ctrl-C
        serve(
            args.runtime_api_address,
            args.parent_pid,
            max(0.01, args.poll_interval),
            args.wake_fd,
            policy=policy,
            policy_args=policy_arguments(policy),
            cold=args.cold,
        )


if __name__ == "__main__":
    main()
