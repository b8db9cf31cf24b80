"""Flower's `flwr` CLI as subprocesses, for the coordinator: start a run, follow its log, read its status.

Flower 1.41's `flwr run --stream` exits 0 whether the run completed or failed, so fedcare starts the
run (`flwr run APP CONNECTION --run-config FILE --format json`: the run id as JSON), follows its log
(`flwr log ID CONNECTION --stream`, which ends when the run has finished) and then reads the run's
real status from `flwr ls CONNECTION --run-id ID --format json`. Only Flower's command line is used,
never its internals, and every call runs with the deployment's FLWR_HOME and with telemetry, the
update check and runtime dependency installation switched off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedcare.errors import FedcareError
from fedcare.safe_environment import SAFE_ENVIRONMENT

CALL_TIMEOUT_S = 300  # one `flwr run` / `flwr ls` call (building and uploading the FAB included)
FINISHED_WAIT_S = 30  # after the log stream ended, how long the status may take to read "finished"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class RunStatus:
    """A run's status as `flwr ls` reports it: ``status`` like ``running`` or ``finished:failed``."""

    status: str
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def flower_executable(name: str) -> str:
    """Flower's executable from this environment (beside this Python), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def plain(line: str) -> str:
    """A log line without terminal colour codes or its line end."""
    return _ANSI.sub("", line).rstrip("\r\n")


class FlowerCli:
    """`flwr` against one SuperLink connection of one FLWR_HOME."""

    def __init__(self, flwr_home: Path, connection: str, executable: str | None = None) -> None:
        self.flwr_home, self.connection = Path(flwr_home), connection
        self.executable = executable or flower_executable("flwr")
        self.env = {**os.environ, **SAFE_ENVIRONMENT, "FLWR_HOME": str(self.flwr_home)}

    def _call(self, *args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [self.executable, *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except FileNotFoundError:
            raise FedcareError(
                f"Flower's `flwr` command was not found ({self.executable})",
                "run fedcare from the environment it was installed in (.venv/bin/fedcare)",
            ) from None
        except subprocess.TimeoutExpired:
            raise FedcareError(
                f"`flwr {args[0]}` got no answer within {CALL_TIMEOUT_S} s from the '{self.connection}' SuperLink",
                "is the SuperLink running and responsive?",
            ) from None

    def _failure(self, what: str, done: subprocess.CompletedProcess) -> FedcareError:
        try:  # `--format json` puts Flower's own message in "error-message"
            said = str(json.loads(done.stdout)["error-message"])
        except (json.JSONDecodeError, KeyError, TypeError):
            said = done.stderr + "\n" + done.stdout
        said = " ".join(ln for ln in plain(said).splitlines() if not ln.startswith("Using SuperLink:"))
        said = " ".join(said.split()) or f"exit status {done.returncode}"
        hint = (
            f"is the SuperLink running (COMMANDS.md, step 1)? `flwr` reaches it through the '{self.connection}' "
            f"connection in {self.flwr_home / 'config.toml'}, from this machine only"
            if re.search(r"unavailable|connect|refused|timed? ?out", said, re.IGNORECASE)
            else ""
        )
        return FedcareError(f"{what} failed: {said[-600:]}", hint)

    def start_run(self, app: Path, run_config: Path) -> int:
        """Submit ``app`` (a Flower app folder) with the run config in the TOML file ``run_config``; the run id."""
        done = self._call("run", str(app), self.connection, "--run-config", str(run_config), "--format", "json")
        try:
            reply = json.loads(done.stdout)
            if done.returncode == 0 and reply.get("success") and reply.get("run-id"):
                return int(reply["run-id"])
        except (json.JSONDecodeError, AttributeError, ValueError):
            pass
        raise self._failure("`flwr run`", done)

    def status(self, run_id: int) -> RunStatus:
        """The run's status from `flwr ls --run-id ID --format json` (the exit code of `flwr run` says nothing)."""
        done = self._call("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(done.stdout).get("runs") or []
        except (json.JSONDecodeError, AttributeError):
            runs = []
        if done.returncode != 0 or not runs:
            raise self._failure(f"`flwr ls --run-id {run_id}`", done)
        details = str(runs[0].get("status-details") or "")
        return RunStatus(str(runs[0]["status"]).lower(), "" if details == "N/A" else details)

    def follow_log(self, run_id: int, on_line: Callable[[str], None]) -> None:
        """Relay the run's log, line by line, until the SuperLink ends the stream (the run finished) or it breaks.

        Each call replays the log from the run's first line. A KeyboardInterrupt stops `flwr log`
        (never the run) and is raised again.
        """
        proc = subprocess.Popen(
            [self.executable, "log", str(run_id), self.connection, "--stream"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                on_line(plain(line))
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def wait_finished(self, run_id: int, timeout: float = FINISHED_WAIT_S, poll_s: float = 2.0) -> RunStatus:
        """The run's status once it reads finished (or the last one read when ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        status = self.status(run_id)
        while not status.finished and time.monotonic() < deadline:
            time.sleep(poll_s)
            status = self.status(run_id)
        return status
