"""`fedcare deploy ...` (coordinator: keys, certificates, commands) and `fedcare node ...` (hospital).

Exit codes (fedcare/error_output.py): 0 done (or the node stopped cleanly), 1 the node or its data
failed (one line saying why and what to do), 2 a usage error (bad settings, refusing to overwrite).

Flower 1.41's processes exit 1 for every failure and print their real reason as
"Exit Code: NNN" in the log, so `node start` relays the node's output and reads that line.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from fedcare.error_output import EXIT_USAGE, fail
from fedcare.errors import FedcareError

deploy_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Coordinator: create the deployment's CA, SuperLink certificate and hospital node keys.",
)
node_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hospital: check settings and data, then run this hospital's SuperNode.",
)


@deploy_app.callback()
def _deploy_root() -> None:
    """Create the key material and commands for a TLS + node-authenticated deployment."""


@node_app.callback()
def _node_root() -> None:
    """Run a hospital's SuperNode from its hospital.toml."""


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def _fail(problem: str, hint: str = "", code: int = EXIT_USAGE) -> None:
    """Report through the one error printer (fedcare/error_output.py: plain text, never markup)."""
    fail(FedcareError(problem, hint), code)


@deploy_app.command()
def init(
    out_dir: Path = typer.Argument(..., help="folder for the CA, SuperLink certificate, node keys and COMMANDS.md"),
    hospital: list[str] = typer.Option(..., "--hospital", help="a hospital's name (repeat once per hospital)"),
    san: list[str] | None = typer.Option(
        None, "--san", help="an IP or DNS name nodes use to reach the SuperLink (repeatable) [127.0.0.1, localhost]"
    ),
    address: str = typer.Option("127.0.0.1:9092", "--address", help="the SuperLink's HOST:PORT"),
    force: bool = typer.Option(
        False, "--force", help="replace existing keys (replaced node keys must be registered again)"
    ),
    superlink_state: str = typer.Option(
        "database",
        "--superlink-state",
        help="database: a SQLite file, kept across SuperLink restarts; memory: about "
        "half the SuperLink's work per request, but a restart loses the nodes "
        "(each hospital starts its node again)",
    ),
    control_port: int | None = typer.Option(
        None,
        "--control-port",
        help="loopback port of the SuperLink's control listener (flwr and SuperExec) [public port + 1]",
    ),
    inside_app: bool = typer.Option(
        False, "--inside-app", help="allow writing inside a Flower app folder (then list it in the app's .gitignore)"
    ),
) -> None:
    """Write a CA, the SuperLink's TLS certificates, one node key per hospital, settings and COMMANDS.md."""
    from fedcare.deploy_pki import init_deployment

    try:
        files = init_deployment(
            out_dir,
            hospital,
            san or None,
            address,
            force=force,
            superlink_state=superlink_state,
            control_port=control_port,
            inside_app=inside_app,
        )
    except FedcareError as exc:
        _fail(exc.problem, exc.hint)
    console = _console()
    console.print(
        f"wrote the deployment to {files.out_dir} (private keys 0600, folders 0700)", highlight=False, markup=False
    )
    for h in files.hospitals:
        console.print(
            f"  {h.name}: hand over {h.folder} (node.key never leaves the hospital)", highlight=False, markup=False
        )
    assert files.commands_file is not None
    console.print(f"\n{files.commands_file.read_text()}", highlight=False, markup=False)


@deploy_app.command()
def renew(
    out_dir: Path = typer.Argument(..., help="the deployment folder `fedcare deploy init` wrote (with ca/ca.key)"),
) -> None:
    """Reissue the SuperLink's TLS certificates from the deployment's CA (same SANs; node keys and CA unchanged)."""
    from fedcare.deploy_pki import renew_superlink_certificates

    try:
        written = renew_superlink_certificates(out_dir)
    except FedcareError as exc:
        _fail(exc.problem, exc.hint)
    console = _console()
    for path in written:
        console.print(f"wrote {path}", highlight=False, markup=False)
    console.print("restart the SuperLink to serve them; hospitals keep their files", highlight=False)


@deploy_app.command("node-key")
def node_key(
    path: Path = typer.Argument(Path("node.key"), help="where to write the private key (the .pub goes next to it)"),
    force: bool = typer.Option(False, "--force", help="replace an existing key"),
) -> None:
    """A hospital makes its own node key; only the printed .pub is sent to the coordinator."""
    from fedcare.deploy_pki import make_node_key

    try:
        public = make_node_key(path, force=force)
    except FedcareError as exc:
        _fail(exc.problem, exc.hint)
    typer.echo(f"private key: {path} (0600, stays here)\npublic key:  {public} (send this to the coordinator)")


@deploy_app.command("identity-key")
def identity_key(
    path: Path = typer.Argument(Path("identity.key"), help="where to write this hospital's identity key"),
    force: bool = typer.Option(False, "--force", help="replace an existing key (the roster must then be re-pinned)"),
) -> None:
    """A hospital makes its own secure-aggregation identity key; it sends only the printed public key."""
    from secure_aggregation.identity import KEY_PREFIX, fingerprint, make_identity_key

    try:
        public = make_identity_key(path, force=force)
    except FedcareError as exc:
        _fail(exc.problem, exc.hint)
    typer.echo(
        f"private key: {path} (0600, stays here)\n"
        f"public key:  {KEY_PREFIX}{public.hex()}  (send this for the consortium roster)\n"
        f"fingerprint: {fingerprint(public)}  (confirm it with every other hospital directly)"
    )


@deploy_app.command("roster")
def roster(
    member: list[str] = typer.Option(..., "--member", help="NAME=ed25519:<hex> for every member hospital"),
    out: Path = typer.Option(Path("roster.toml"), "--out", help="where to write the roster"),
) -> None:
    """Write the consortium roster from every member's public identity key, with the fingerprints to check."""
    from secure_aggregation.identity import KEY_PREFIX, Roster, fingerprint

    members: dict[str, bytes] = {}
    for entry in member:
        name, _, key = entry.partition("=")
        try:
            if not name or name in members or not key.startswith(KEY_PREFIX):
                raise ValueError
            members[name] = bytes.fromhex(key[len(KEY_PREFIX) :])
        except ValueError:
            _fail(
                f"--member {entry!r} is not NAME={KEY_PREFIX}<64 hex> (or names a member twice)",
                "use the public key `fedcare deploy identity-key` printed at that hospital",
            )
    out.write_text(Roster.text(members))
    try:
        Roster.load(out)
    except FedcareError as exc:
        out.unlink()
        _fail(exc.problem, exc.hint)
    typer.echo(f"wrote {out}; every hospital checks these fingerprints before pinning it:")
    for name in sorted(members):
        typer.echo(f"  {name}: {fingerprint(members[name])}")


# Flower's log line "Exit Code: NNN" and what each means to a hospital.
_EXIT_LINE = re.compile(r"Exit Code: (\d+)")


def diagnose(lines: list[str], returncode: int, settings) -> str | None:
    """One line saying why the SuperNode stopped, or None when it stopped cleanly."""
    text = "\n".join(lines)
    codes = _EXIT_LINE.findall(text)
    if returncode == 0 and not codes:
        return None
    code = int(codes[-1]) if codes else None
    address = settings.superlink_address
    if code == 305:
        if "Failed to activate SuperNode" in text or "[code: 2004]" in text:
            return (
                f"this node's public key is not registered with the SuperLink at {address}: send "
                f"{settings.public_key} to the coordinator, who runs "
                f"`flwr supernode register {settings.public_key.name} <connection>`, then start again"
            )
        if "certificate has expired" in text:  # OpenSSL's reason, in Flower's log (not the CA, not the SANs)
            from fedcare.tls_files import RENEW_HINT

            return f"the SuperLink's certificate at {address} has expired: {RENEW_HINT}"
        if "certificate is not yet valid" in text:
            return (
                f"the SuperLink's certificate at {address} is not valid yet: check the clock of this machine and "
                "of the SuperLink's machine (both should follow NTP)"
            )
        if re.search(r"certificate|ssl|tls", text, re.IGNORECASE):
            return (
                f"TLS failure talking to {address}: the SuperLink's certificate was not accepted with "
                f"{settings.root_certificates} (it must be the deployment's ca.crt, and the host of "
                f"'{address}' must be one of the certificate's SANs)"
            )
        if "Connection refused" in text:
            return f"connection refused at {address}: is the SuperLink running, and is the address/port right?"
        if "Server disconnected" in text:
            return f"{address} closed the connection: is it a fedcare SuperLink speaking TLS on that port?"
        return f"could not connect to the SuperLink at {address} (Flower exit code 305): see the log above"
    if code == 302:
        return (
            f"{settings.private_key} is not an EC private key in OpenSSH format: use the node.key from `fedcare deploy`"
        )
    if code is not None:
        last = next((ln for ln in reversed(lines) if ln.strip() and "Exit Code" not in ln), "")
        return f"flower-supernode stopped with Flower exit code {code}: {last.strip()}"
    return f"flower-supernode exited with status {returncode}: see the log above"


_RETRY_LINE = re.compile(r"Connection attempt failed, retrying in")


def name_the_superlink(line: str, address: str) -> str:
    """Flower's retry warning, which names no address, with the SuperLink it cannot reach (other lines unchanged).

    Once joined, a node keeps retrying a SuperLink that went away (a restarted SuperLink is
    rejoined, see "Resume after a crash"), so every retry line says which address is not answering.
    """
    if _RETRY_LINE.search(line):
        return f"{line} (fedcare: cannot reach the SuperLink at {address}; the node keeps retrying, Ctrl-C stops it)"
    return line


def _flower_bin(name: str) -> str:
    """Flower's executable from this environment (so flower-superexec is found beside it)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def shell_line(command: list[str]) -> str:
    """The command as one copy-pasteable shell line (`--node-config "k='v'"` rather than '"'"' escapes)."""

    def quote(arg: str) -> str:
        if "'" in arg and not re.search(r'["$`\\!]', arg):
            return f'"{arg}"'
        return shlex.quote(arg)

    return " ".join(quote(a) for a in command)


def run_supernode(command: list[str], echo=print) -> tuple[int, list[str]]:
    """Run the SuperNode in the foreground, relaying its log; SIGTERM/SIGINT are passed on to it.

    When flower-supernode exits early (e.g. refused), its executor child (Flower's flower-superexec,
    or fedcare's warm ClientApp executor) is orphaned and can hold the log pipe (Flower 1.41,
    measured): so the node runs in its own process group, and the whole group is stopped once the
    SuperNode itself has exited.
    """
    from fedcare.safe_environment import apply_safe_environment

    apply_safe_environment()
    env = dict(os.environ)
    env["PATH"] = f"{Path(command[0]).parent}{os.pathsep}{env.get('PATH', '')}"
    tail: collections.deque[str] = collections.deque(maxlen=200)
    # Own session: a terminal's Ctrl-C reaches only us and is passed on once (Flower force-exits on a second).
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        errors="replace",
        start_new_session=True,
    )

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line.rstrip("\n"))
            tail.append(line.rstrip("\n"))

    def forward(signum, _frame) -> None:
        proc.send_signal(signum)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # orphaned flower-superexec, if any
    reader.join(timeout=30)
    return returncode, list(tail)


def _checked_node_settings(config: Path, console: Console):
    """hospital.toml read, its certificate and key files checked and its data loaded once (or the command fails)."""
    from fedcare.node_settings import check_credentials, check_data, load_node_settings

    try:
        settings = load_node_settings(config)
        check_credentials(settings)
    except FedcareError as exc:
        _fail(exc.problem, exc.hint, 2)
    try:
        data = check_data(settings)
    except FedcareError as exc:
        _fail(f"the node's data would not load: {exc.problem}", exc.hint, 1)
    console.print(
        f"data ok: {data.name} ({settings.dataset}), {len(data.y_train)} training and {len(data.y_test)} test examples",
        highlight=False,
        markup=False,
    )
    for note in data.notes:
        console.print(Text(note, style="dim"), highlight=False)  # notes name the user's columns
    return settings


@node_app.command()
def start(
    config: Path = typer.Option(..., "--config", help="this hospital's hospital.toml"),
    check_only: bool = typer.Option(
        False,
        "--check-only",
        help="validate settings, certificate and key files, data "
        "and the SuperLink's address (asked once), print the command, stop",
    ),
) -> None:
    """Validate hospital.toml, its certificate and key files, the local data and the SuperLink's address and
    certificate, then run flower-supernode in the foreground.

    A SuperLink that does not answer is waited for (`[superlink] connect-wait` seconds, the address
    named on every attempt) and then reported; `--check-only` asks once.
    """
    from fedcare.node_settings import supernode_command
    from fedcare.superlink_probe import probe_superlink, wait_for_superlink

    console = _console()
    settings = _checked_node_settings(config, console)
    Path(str(settings.node_config["ledger-dir"])).mkdir(parents=True, exist_ok=True, mode=0o700)
    command = supernode_command(settings, _flower_bin("flower-supernode"))
    console.print(shell_line(command), highlight=False, markup=False, soft_wrap=True)
    try:
        if check_only:
            probe_superlink(settings.superlink_address, settings.root_certificates)
        else:
            wait_for_superlink(
                settings.superlink_address,
                settings.root_certificates,
                settings.superlink_wait_s,
                say=lambda line: typer.echo(line, err=True),
            )
    except FedcareError as exc:
        _fail(exc.problem, exc.hint, 1)
    console.print(
        f"superlink ok: {settings.superlink_address} answers TLS with a certificate this node accepts",
        highlight=False,
        markup=False,
    )
    if check_only:
        raise typer.Exit(0)
    returncode, lines = run_supernode(
        command, echo=lambda line: typer.echo(name_the_superlink(line, settings.superlink_address))
    )
    reason = diagnose(lines, returncode, settings)
    if reason is not None:
        _fail(reason, code=1)
    console.print("the node stopped", highlight=False)


@node_app.command()
def budget(
    config: Path = typer.Option(..., "--config", help="this hospital's hospital.toml"),
    to: float = typer.Option(..., "--to", help="the new lifetime epsilon budget of this hospital's dataset"),
    reason: str = typer.Option(..., "--reason", help="who approved the raise, and why (kept in the signed audit log)"),
) -> None:
    """Raise this hospital's privacy budget: a signed record in its audit log, then the ledger follows.

    A budget raised only in hospital.toml (or in the ledger file) is refused at the next release; this
    command is the explicit step that makes a raise count. Set the same value as epsilon-budget in
    hospital.toml. Lowering the budget needs no command.
    """
    from client import audit_trail
    from client.ledger_guard import raise_budget
    from fedcare.node_settings import check_data, load_node_settings

    try:
        settings = load_node_settings(config, check_port=False)
        data = check_data(settings)
        ledger_dir = str(settings.node_config["ledger-dir"])
        dataset_id = str(settings.node_config["dataset-id"])
        before = raise_budget(
            audit_trail.open_log(ledger_dir, data.name), ledger_dir, data.name, dataset_id, to, reason
        )
    except FedcareError as exc:
        _fail(exc.problem, exc.hint, 1)
    _console().print(
        f"{data.name}: the budget of {dataset_id} is now {to:g} (was {before:g}); recorded in the signed audit log",
        highlight=False,
        markup=False,
    )
    if float(settings.node_config["epsilon-budget"]) < to:
        _console().print(
            f"set epsilon-budget = {to:g} in {config} for the node to use it", highlight=False, markup=False
        )


from fedcare.code_commands import approve, approved, fab  # noqa: E402  (which code a node runs: fedcare/code_commands.py)

node_app.command("approve")(approve)
node_app.command("approved")(approved)
deploy_app.command("fab")(fab)
