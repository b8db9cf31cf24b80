"""`flower-supernode` with fedcare's latency settings: `python -m fedcare.node_launcher [OPTIONS] -- FLOWER_ARGS`.

FLOWER_ARGS are passed to Flower 1.41's own `flower-supernode` entry point unchanged (TLS, node
key, node config, Runtime API port), in this process. Two options cut a deployment round's
waiting time (measured in docs/benchmarks.md):

`--warm-clientapp`
    Adds `--isolation process` (Flower's documented mode in which the node starts no executor of
    its own) and starts `fedcare.warm_clientapp` as this node's executor: still one process per
    message, but forked from a process that imported torch/opacus/pandas once, instead of a cold
    `flwr-clientapp` per message (5-15 s of imports on a 2-core machine).

`--poll-interval S`
    Flower 1.41's SuperNode asks the SuperLink for a new message every 3 s (a constant in
    `flwr.supernode.start_client_internal`, with no flag or variable to change it), and checks for
    its ClientApp's reply every 0.5 s. With this option, while a run is active (a message arrived
    in the last 120 s) the node asks again 50 ms after each message, backing off to every S
    seconds, and checks for replies every 20 ms; an idle node keeps Flower's 3 s. It also retries a not-yet-uploaded message object after 20 ms rather
    than 1 s. See `fedcare/flower_latency.py`: process-local, Flower 1.41.0 only (any other
    version: a warning, Flower's timing).

Every message, log line and exit code is Flower's: `fedcare node start` reads them as before.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fedcare.flower_latency import (FLOWER_IDLE_POLL_S, on_message_stored, patch_supernode_polling,
                                    shorten_object_pull_backoff)


def _runtime_api_address(flower_args: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="9094")
    known, _ = parser.parse_known_args(flower_args)
    host = f"[{known.host}]" if ":" in known.host else known.host
    return f"{host}:{known.port}"


def start_warm_executor(runtime_api_address: str, restarts: int = 3) -> None:
    """Start fedcare.warm_clientapp for this node; wake it through a pipe whenever a message is stored.

    The executor then asks for the task at once (no polling delay, and never before the message's
    objects are all stored); it also checks every 10 s on its own, as a safety net. It runs in
    this node's process group, so stopping the node's group stops it, and it exits on its own
    within 0.2 s when this process does (Flower's parent-process monitor). Should it die while
    the node runs, it is restarted (up to ``restarts`` times), so messages do not wait forever.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    command = [sys.executable, "-m", "fedcare.warm_clientapp", "--runtime-api-address", runtime_api_address,
               "--parent-pid", str(os.getpid()), "--wake-fd", str(read_end)]

    def wake() -> None:
        try:
            os.write(write_end, b".")
        except (BlockingIOError, BrokenPipeError):
            pass   # already awake (pipe full) or gone (it polls on its own)

    def supervise() -> None:
        from logging import ERROR, WARNING

        from flwr.supercore import log

        stopped = (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL)   # the node is stopping
        for attempt in range(restarts + 1):
            executor = subprocess.Popen(command, pass_fds=(read_end,))  # noqa: S603
            code = executor.wait()
            if code in stopped:
                return
            if attempt < restarts:
                log(WARNING, "fedcare: the warm ClientApp executor exited (status %s); restarting it", code)
                wake()   # a task may be waiting
        log(ERROR, "fedcare: the warm ClientApp executor keeps failing; this node cannot run ClientApps. "
            "Set warm-clientapp = false in hospital.toml to use Flower's own executor, and report the log above")

    on_message_stored(wake)
    threading.Thread(target=supervise, name="fedcare-warm-executor", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        at = argv.index("--")
        ours, flower_args = argv[:at], argv[at + 1:]
    else:
        ours, flower_args = [], argv
    parser = argparse.ArgumentParser(prog="python -m fedcare.node_launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="seconds between message polls while a run is active (Flower: 3)")
    parser.add_argument("--warm-clientapp", action="store_true",
                        help="run ClientApps forked from a warm executor (--isolation process)")
    args = parser.parse_args(ours)

    if args.poll_interval is not None and args.poll_interval < FLOWER_IDLE_POLL_S:
        patch_supernode_polling(max(0.05, args.poll_interval))
        shorten_object_pull_backoff()   # a prompt node would otherwise meet half-uploaded messages and sleep 1 s
    if args.warm_clientapp:
        if "--isolation" in flower_args:
            parser.error("--warm-clientapp sets --isolation process itself")
        flower_args += ["--isolation", "process"]
        start_warm_executor(_runtime_api_address(flower_args))

    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = [str(Path(sys.executable).with_name("flower-supernode")), *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
