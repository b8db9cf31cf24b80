"""The FAB `flwr run .` ships carries fedcare's code and nothing else, and is complete.

`[tool.flwr.app] fab-include` in pyproject.toml names the packages the ServerApp and ClientApp import
(*.py only). Built from a copy of the project that also holds what a coordinator's working folder
accumulates (a `deploy/` folder with keys, settings, ledgers and an `flwr-home/apps` tree of installed
FABs, `runs/` outputs), the FAB still lists code only; the ClientApp and ServerApp import entirely from
the installed FAB; and `fedcare deploy fab` prints the digest Flower's own build gives.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedcare.compat.flower import build_fab
from fedcare.fab_approval import inspect_fab
from fedcare.project_packages import PACKAGES
from tests.conftest import ROOT

_SKIP = shutil.ignore_patterns(
    ".venv",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "runs",
    "fedcare-runs",
    "fedcare-ledgers",
    "deploy",
    ".flwr",
    "*.egg-info",
)


def _names(fab: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project plus a coordinator's clutter: deploy/ (keys, settings, json/md/toml/jsonl), runs/."""
    copy = tmp_path_factory.mktemp("copy") / "fedcare"
    shutil.copytree(ROOT, copy, ignore=_SKIP)
    # a coordinator whose .gitignore does not list the deployment folders: fab-include alone must hold
    ignore = copy / ".gitignore"
    ignore.write_text(
        "".join(
            line + "\n" for line in ignore.read_text().splitlines() if line.strip() not in ("deploy/", "flwr-home/")
        )
    )
    deploy = copy / "deploy"
    for path, text in {
        "COMMANDS.md": "# commands\n",
        "cleveland/hospital.toml": "[node]\n",
        "cleveland/node.key": "PRIVATE\n",
        "cleveland/ledgers/privacy-ledger-cleveland.json": '{"epsilon": 0.4}\n',
        "cleveland/ledgers/audit/cleveland.jsonl": '{"release": 1}\n',
        "ca/ca.key": "PRIVATE\n",
        "flwr-home/config.toml": "[superlink]\n",
        "superlink/state.json": "{}\n",
        "flwr-home/apps/fedcare.fedcare.0.1.0.0123abcd/client/client_app.py": "app = None\n",
    }.items():
        (deploy / path).parent.mkdir(parents=True, exist_ok=True)
        (deploy / path).write_text(text)
    for path in ("runs/latest/results.json", "runs/latest/report.md", "runs/latest/curves.toml"):
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_text("{}\n")
    return copy


def _expected_code(project: Path) -> set[str]:
    return {
        p.relative_to(project).as_posix()
        for pkg in PACKAGES
        for p in (project / pkg).rglob("*.py")
        if "__pycache__" not in p.parts and not p.name.startswith("test_") and not p.name.endswith("_test.py")
    }


def test_the_fab_flwr_run_ships_holds_the_apps_code_and_nothing_else(project):
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(project)  # what `flwr run .` ships (Flower's own build)
    names = _names(fab)
    code = _expected_code(project)
    assert set(names) == code | {"pyproject.toml", ".info/CONTENT"}
    assert {"client/client_app.py", "server/server_app.py", "fedcare/fab_approval.py"} <= code
    assert not [n for n in names if n.startswith(("deploy/", "runs/", "tests/", "bench/", "docs/"))]
    contents = inspect_fab(fab)  # what a hospital's node accepts
    assert contents.app_id == "fedcare/fedcare" and len(contents.files) == len(code) + 1
    assert build_fab(project) == (fab, None)  # `fedcare deploy fab`: the same bytes, so the same digest


def test_a_deep_flwr_home_tree_does_not_stop_fedcare_deploy_fab(project, tmp_path):
    """Flower checks the depth of every *.py/*.toml/*.json... before `fab-include` applies (only the root
    .gitignore is honoured): an flwr-home/apps tree of installed FABs nested past 10 folders stops its
    build. `fedcare deploy fab` still builds the FAB Flower would ship once that tree is ignored."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import AppPathDepthError

    plain = build_fab_from_disk(project)
    deep = project / "deploy" / "flwr-home" / "apps" / "fedcare.fedcare.0.1.0.0123abcd"
    nested = deep.joinpath(*[f"level{i}" for i in range(12)])
    nested.mkdir(parents=True)
    (nested / "module.py").write_text("x = 1\n")
    (nested / "records.json").write_text("{}\n")
    try:
        with pytest.raises(AppPathDepthError):
            build_fab_from_disk(project)
        fab, note = build_fab(project)
        assert fab == plain and "maximum directory depth" in note
        assert set(_names(fab)) <= _expected_code(project) | {"pyproject.toml", ".info/CONTENT"}

        out = tmp_path / "app.fab"
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fedcare.cli import main; main()",
                "deploy",
                "fab",
                str(project),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        digest = hashlib.sha256(plain).hexdigest()
        assert f"sha256:{digest}" in done.stdout and out.read_bytes() == plain
        assert "client/client_app.py" in done.stdout and "deploy/" not in done.stdout
        assert ".gitignore" in done.stderr  # says how to make `flwr run` itself build it

        # With deploy/ in the root .gitignore, Flower's own build (`flwr run`) gives that same FAB.
        gitignore = project / ".gitignore"
        original = gitignore.read_text()
        gitignore.write_text(original + "deploy/\n")
        try:
            assert build_fab_from_disk(project) == plain
        finally:
            gitignore.write_text(original)
    finally:
        shutil.rmtree(deep / "level0")


def test_the_client_and_server_apps_import_only_from_the_installed_fab(project, tmp_path):
    """Nothing the apps import is missing from the FAB (no module falls back to this checkout)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    installed = install_from_fab(build_fab_from_disk(project), install_dir=tmp_path / "home", skip_prompt=True)
    script = f"""
import sys
sys.path.insert(0, {str(installed)!r})
import client.client_app, server.server_app
ours = {{n: m for n, m in sys.modules.items() if n.partition(".")[0] in {PACKAGES!r}}}
outside = sorted(n for n, m in ours.items() if getattr(m, "__file__", None) and
                 not m.__file__.startswith({str(installed)!r}))
print(len(ours), outside)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    count, outside = done.stdout.split(" ", 1)
    assert int(count) > 10 and outside.strip() == "[]", done.stdout
