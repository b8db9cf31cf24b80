"""`flower-supernode` running approved FABs only, faster: `python -m fedcare.node_launcher [OPTIONS] -- FLOWER_ARGS`.

FLOWER_ARGS are passed to Flower 1.41's own `flower-supernode` entry point unchanged (TLS, node
key, node config, Runtime API port), in this process. `--warm-clientapp` and `--poll-interval`
cut a deployment round's waiting time (measured in docs/benchmarks.md); the approval options
decide which FABs the node runs:

`--warm-clientapp`
    Adds `--isolation process` (Flower's documented mode in which the node starts no executor of
    its own) and starts `fedcare.warm_clientapp` as this node's executor: still one process per
    message, but forked from a process that imported torch/opacus/pandas once, instead of a cold
    `flwr-clientapp` per message (5-15 s of imports on a 2-core machine). Without it (and without
    `--allow-any-fab`) the same executor runs with `--cold`. The executor stands in for Flower's
    `flower-superexec` through Flower internals verified on Flower 1.41.0 only: on any other Flower
    the node runs Flower's own executor (a fresh `flwr-clientapp` per message) and says so once.

`--approved-fabs FILE`, `--approve DIGEST` (repeatable), `--settings HOSPITAL_TOML`
    FAB approval, ON by default: the node runs a ClientApp only from a FAB whose SHA-256 digest is in
    the hospital's approval store (`fedcare node approve` writes it; read for every task) or given
    with `--approve`, and that carries code only (fedcare/fab_approval.py). The check runs in this
    node's ClientApp executor, from the node's own fedcare, after the task's FAB is pulled and before
    it is installed or imported; a refusal goes back to the coordinator as Flower's Error reply,
    naming the digest and the approving command (with the hospital.toml given by `--settings`).
    With none of these options every FAB is refused. The node therefore always runs with
    `--isolation process` and fedcare's executor: warm (`--warm-clientapp`) or cold (one fresh
    interpreter per task, the same checked path). On a Flower other than 1.41.0 the check cannot be
    hooked, and the node does not start.

`--allow-any-fab`
    UNSAFE: turns approval off; the node runs whatever FAB the SuperLink ships (then, without
    `--warm-clientapp`, with Flower's own executor, as plain `flower-supernode`). The coordinator then
    decides what code runs next to the hospital's data, and every node-side check can be skipped.

`--poll-interval S`
    Flower 1.41's SuperNode asks the SuperLink for a new message every 3 s (a constant in
    `flwr.supernode.start_client_internal`, with no flag or variable to change it), and checks for
    its ClientApp's reply every 0.5 s. With this option, while a run is active (a message arrived
    in the last 120 s) the node asks again 50 ms after each message, backing off to every S
    seconds, and checks for replies every 20 ms; an idle node keeps Flower's 3 s. It also retries a not-yet-uploaded message object after 20 ms rather
    than 1 s. See `fedcare/compat/flower.py`: process-local, Flower 1.41.0 only (any other
    version: a warning, Flower's timing).

Before Flower starts, the `--root-certificates` and `--auth-supernode-private-key` files are read
and checked (`fedcare/tls_files.py`): a corrupted or wrong-type file is a usage error naming it.

Every message, log line and exit code is Flower's (plus fedcare's own "fedcare: ..." lines, e.g. a
refused FAB): `fedcare node start` reads them as before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fedcare.compat.flower import (
    FAB_GUARD_REFUSAL,
    FLOWER_IDLE_POLL_S,
    PATCHED_FLOWER,
    executor_supported,
    fab_guard_supported,
    flower_version,
    on_message_stored,
    patch_supernode_polling,
    shorten_object_pull_backoff,
)
from fedcare.errors import FedcareError
from fedcare.fab_approval import (
    FabPolicy,
    add_policy_arguments,
    policy_arguments,
    policy_from_arguments,
    read_approvals,
)


def _runtime_api_address(flower_args: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="9094")
    known, _ = parser.parse_known_args(flower_args)
    host = f"[{known.host}]" if ":" in known.host else known.host
    return f"{host}:{known.port}"


def start_executor(runtime_api_address: str, policy: FabPolicy | None, warm: bool = True, restarts: int = 3) -> None:
    """Start fedcare.warm_clientapp (warm, or ``--cold``) for this node; wake it whenever a message is stored.

    The executor then asks for the task at once (no polling delay, and never before the message's
    objects are all stored); it also checks every 10 s on its own, as a safety net. It runs in
    this node's process group, so stopping the node's group stops it, and it exits on its own
    within 0.2 s when this process does (Flower's parent-process monitor). Should it die while
    the node runs, it is restarted (up to ``restarts`` times), so messages do not wait forever.
    Every task's FAB must pass ``policy`` (None: any FAB) before it is installed.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    command = [
        sys.executable,
        "-m",
        "fedcare.warm_clientapp",
        "--runtime-api-address",
        runtime_api_address,
        "--parent-pid",
        str(os.getpid()),
        "--wake-fd",
        str(read_end),
        *([] if warm else ["--cold"]),
        *policy_arguments(policy),
    ]

    def wake() -> None:
        with contextlib.suppress(
            BlockingIOError, BrokenPipeError
        ):  # already awake (pipe full) or gone (it polls on its own)
            os.write(write_end, b".")

    def supervise() -> None:
        from logging import ERROR, WARNING

        from flwr.supercore import log

        stopped = (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL)  # the node is stopping
        for attempt in range(restarts + 1):
            executor = subprocess.Popen(command, pass_fds=(read_end,))
            code = executor.wait()
            if code in stopped:
                return
            if attempt < restarts:
                log(WARNING, "fedcare: the ClientApp executor exited (status %s); restarting it", code)
                wake()  # a task may be waiting
        log(
            ERROR,
            "fedcare: the ClientApp executor keeps failing; this node cannot run ClientApps. %sreport the log above",
            "Set warm-clientapp = false in hospital.toml (a fresh process per message), and " if warm else "",
        )

    on_message_stored(wake)
    threading.Thread(target=supervise, name="fedcare-warm-executor", daemon=True).start()


def _approval_policy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FabPolicy | None:
    """The node's FAB policy, checked before the node connects: a readable store, a Flower that can be hooked."""
    from logging import INFO, WARNING

    from flwr.supercore import log

    stored = 0
    try:
        policy = policy_from_arguments(args)
        if policy is not None and policy.store is not None:
            stored = len(read_approvals(policy.store))
    except FedcareError as exc:
        parser.error(str(exc))
    if policy is None:
        log(WARNING, "fedcare: --allow-any-fab: this node runs ANY FAB the SuperLink ships, unchecked (unsafe)")
        return None
    if not fab_guard_supported():
        sys.exit(
            "fedcare: "
            + FAB_GUARD_REFUSAL.format(wanted=PATCHED_FLOWER, found=flower_version())
            + f" -> install flwr=={PATCHED_FLOWER} (the version this fedcare pins)"
        )
    if policy.store is None and not policy.digests:
        log(WARNING, "fedcare: no approval store and no approved digest: this node refuses every FAB")
    else:
        log(
            INFO,
            "fedcare: this node runs only approved, code-only FABs (%s%d given with --approve)",
            f"{stored} approved in {policy.store}, " if policy.store is not None else "",
            len(policy.digests),
        )
    return policy


def choose_executor(warm_requested: bool, policy: FabPolicy | None) -> str | None:
    """Which ClientApp executor the node runs: "warm", "cold" (fedcare's, a fresh interpreter per task) or
    None (Flower's own, as plain `flower-supernode`).

    fedcare's executor runs Flower's ClientApp runtime through internals verified on one Flower
    (``fedcare.compat.flower.executor_supported``); on another Flower a warm executor would fail every
    task, so the node falls back to Flower's own executor (one warning). A node with FAB approval on
    never gets here on another Flower: ``_approval_policy`` stops it first.
    """
    if not warm_requested and policy is None:
        return None
    if not executor_supported():
        return None
    return "warm" if warm_requested else "cold"


def _check_tls_files(parser: argparse.ArgumentParser, flower_args: list[str]) -> None:
    """Read the CA and node key Flower is given before it starts: a corrupted or wrong-type file is one
    error naming it (Flower reads them only when it connects, and hangs with its port held)."""
    from fedcare.tls_files import read_ca_certificates, read_node_key

    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--root-certificates")
    files.add_argument("--auth-supernode-private-key")
    known, _ = files.parse_known_args(flower_args)
    try:
        if known.root_certificates:
            read_ca_certificates(Path(known.root_certificates), "--root-certificates")
        if known.auth_supernode_private_key:
            read_node_key(Path(known.auth_supernode_private_key), "--auth-supernode-private-key")
    except FedcareError as exc:
        parser.error(str(exc))


def _forget_secure_aggregation_keys(flower_args: list[str]) -> None:
    """No secure-aggregation run survives a node restart (a resumed run agrees new keys): delete the
    private key material of every earlier run in this node's ledger folder before the node joins."""
    if "--node-config" not in flower_args:
        return
    from flwr.common.config import parse_config_args

    from client.secure_update import forget_all

    config = parse_config_args([flower_args[flower_args.index("--node-config") + 1]])
    if config.get("ledger-dir"):
        removed = forget_all(str(config["ledger-dir"]))
        if removed:
            print(f"fedcare: deleted the secure-aggregation keys of {removed} earlier run(s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        at = argv.index("--")
        ours, flower_args = argv[:at], argv[at + 1 :]
    else:
        ours, flower_args = [], argv
    parser = argparse.ArgumentParser(prog="python -m fedcare.node_launcher", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="seconds between message polls while a run is active (Flower: 3)",
    )
    parser.add_argument(
        "--warm-clientapp", action="store_true", help="run ClientApps forked from a warm executor (--isolation process)"
    )
    add_policy_arguments(parser)
    args = parser.parse_args(ours)
    policy = _approval_policy(parser, args)
    _check_tls_files(parser, flower_args)
    _forget_secure_aggregation_keys(flower_args)

    if args.poll_interval is not None and args.poll_interval < FLOWER_IDLE_POLL_S:
        patch_supernode_polling(max(0.05, args.poll_interval))
        shorten_object_pull_backoff()  # a prompt node would otherwise meet half-uploaded messages and sleep 1 s
    executor = choose_executor(args.warm_clientapp, policy)
    if executor is not None:
        if "--isolation" in flower_args:
            parser.error(
                "fedcare's ClientApp executor (warm, or the FAB approval check) sets --isolation process itself"
            )
        flower_args += ["--isolation", "process"]
        start_executor(_runtime_api_address(flower_args), policy, warm=executor == "warm")

    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = [str(Path(sys.executable).with_name("flower-supernode")), *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
