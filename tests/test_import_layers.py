"""The import layers (docs/architecture.md): import-linter's contracts in pyproject.toml hold.

``lint-imports`` runs in a subprocess and the test fails with its report when a contract is
broken. Every import statement counts, function-level ones included. The contracts name
``fedcare``'s modules one by one (the package holds both the tooling and the base), so two more
checks keep them whole: every module of the project sits in exactly one layer, and the "base"
contract's lists are the layers' own. A copy of the project with one import added shows that the
linter does fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedcare.project_packages import PACKAGES
from tests.conftest import ROOT

SETTINGS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in SETTINGS["contracts"]}
LINT = [
    sys.executable,
    "-c",  # the venv's `lint-imports`
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
    "--no-cache",
    "--no-logo",
]
BASE_LAYERS = 3  # wire and settings, models, core: the bottom three layers


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400"}  # one line per contract in the report
    return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=120, env=env)


def _layer_modules(layer: str) -> list[str]:
    return [name.strip() for name in re.split(r"[:|]", layer)]


def _project_modules(root: Path) -> list[str]:
    """Every module of the project's packages, as dotted names (a package by its own name)."""
    modules = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_the_import_contracts_are_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, (
        f"an import breaks the layers (docs/architecture.md):\n{result.stdout}{result.stderr}"
    )
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout


def test_the_contracts_cover_every_project_package() -> None:
    assert SETTINGS["root_packages"] == list(PACKAGES)
    assert sorted(CONTRACTS["acyclic"]["ancestors"]) == sorted(PACKAGES)


def test_every_module_sits_in_exactly_one_layer() -> None:
    layers = [_layer_modules(layer) for layer in CONTRACTS["layers"]["layers"]]
    placed = {}
    for module in _project_modules(ROOT):
        if module == "fedcare":  # the package itself (empty): its modules are placed one by one
            continue
        homes = [
            i for i, names in enumerate(layers) for name in names if module == name or module.startswith(name + ".")
        ]
        placed[module] = homes
    assert {m: homes for m, homes in placed.items() if len(homes) != 1} == {}, (
        "each module must sit in exactly one layer of [tool.importlinter] 'layers' in pyproject.toml "
        "(module: indexes of the layers naming it); see docs/architecture.md"
    )


def test_the_base_contract_lists_are_the_layers_own() -> None:
    layers = [_layer_modules(layer) for layer in CONTRACTS["layers"]["layers"]]
    base = CONTRACTS["base"]
    assert sorted(base["source_modules"]) == sorted(m for names in layers[-BASE_LAYERS:] for m in names)
    assert sorted(base["forbidden_modules"]) == sorted(m for names in layers[:-BASE_LAYERS] for m in names)


BROKEN = {
    # a role importing the other role, inside a function: the roles and the layers break
    "client/dp_trainer.py": (
        "def _broken():\n    import server.federation_loop\n",
        ["Roles: client and server are independent", "Layers:"],
    ),
    # the base importing the CLI
    "fedcare/errors.py": ("def _broken():\n    import fedcare.cli\n", ["Base:", "Layers:"]),
    # a module importing its caller inside the ClientApp's package
    "client/datasets/hospital_data.py": ("def _broken():\n    import client.client_app\n", ["Client data flow:"]),
    # a cycle inside one layer's package
    "simulation/pbc2.py": ("def _broken():\n    import simulation.generated_data\n", ["No cycles:"]),
}


@pytest.mark.parametrize("module", sorted(BROKEN))
def test_a_forbidden_import_fails_the_linter(tmp_path: Path, module: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    added, broken = BROKEN[module]
    with (tmp_path / module).open("a") as f:
        f.write("\n\n" + added)
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = [line.strip() for line in result.stdout.splitlines() if line.strip().endswith(("KEPT", "BROKEN"))]
    for name in broken:
        assert next(v for v in verdicts if v.startswith(name)).endswith("BROKEN"), result.stdout
