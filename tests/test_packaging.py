"""Packaging: every imported distribution is declared; the wheel and the FAB carry product code only.

Read with ``ast`` alone (nothing is imported): every import statement, function-level ones
included, of the product packages, the tests and the benchmarks. A product import must resolve
to a distribution in ``[project].dependencies`` (a hospital installs the wheel, not the venv);
tests and benchmarks may also use the ``test`` extra. Test support lives in ``tests/support``,
benchmark code in ``bench/``: no product module imports either, the tests never import ``bench``
or another test module, and the benchmarks never import ``tests``.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

from fedcare.project_packages import PACKAGES as PRODUCT
from tests.conftest import ROOT

NOT_SHIPPED = ("tests", "bench")
# Code only tests or benchmarks used, once shipped in the product: gone for good.
MOVED_OUT = ("secure_aggregation/inprocess.py", "secure_aggregation/bench.py")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*requirements: str) -> set[str]:
    """The distribution names of requirement strings (``name[extra]>=1`` -> ``name``)."""
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r.strip()).group(0)) for r in requirements}


def _python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


@functools.cache
def _tree(path: Path) -> ast.Module:
    """The parsed file (each file is read once for all the checks)."""
    return ast.parse(path.read_text(), str(path))


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every absolute module name ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``), with its line."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}:{node.lineno}: relative import; spell it out"
            yield node.module, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (slow to build: once)."""
    return packages_distributions()


def _undeclared(folders: tuple[str, ...], declared: set[str]) -> list[str]:
    """``top-level module (distribution): first importer`` for each third-party import not in ``declared``."""
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    to_distributions = _distributions()
    missing: dict[str, str] = {}
    for path in _python_files(*folders):
        for module, line in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in local or top == "__future__":
                continue
            distributions = to_distributions.get(top, [])
            if not distributions or not declared & {_normalise(d) for d in distributions}:
                missing.setdefault(
                    f"{top} ({', '.join(distributions) or 'not installed'})", f"{path.relative_to(ROOT)}:{line}"
                )
    return [f"{name}: {where}" for name, where in sorted(missing.items())]


def test_every_distribution_the_product_imports_is_a_declared_dependency() -> None:
    assert _undeclared(PRODUCT, _declared(*PYPROJECT["project"]["dependencies"])) == []


def test_every_distribution_tests_and_benchmarks_import_is_declared() -> None:
    declared = _declared(*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"])
    assert _undeclared(NOT_SHIPPED, declared) == []


def test_every_top_level_package_is_shipped_or_not_and_neither_wheel_nor_fab_holds_tests_or_bench() -> None:
    """Wheel and FAB lists equal to ``PACKAGES``: tests/test_project_packages.py. Here: no package left unclassified."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == {*PRODUCT, *NOT_SHIPPED}, "a new top-level package: ship it (PACKAGES) or not (NOT_SHIPPED)"
    shipped = [
        *PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"],
        *PYPROJECT["tool"]["flwr"]["app"]["fab-include"],
    ]
    assert [entry for entry in shipped if entry.split("/")[0] in NOT_SHIPPED] == []


def test_no_product_module_imports_test_or_benchmark_code() -> None:
    assert [m for m in MOVED_OUT if (ROOT / m).exists()] == []
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _python_files(*PRODUCT)
        for module, line in _imports(path)
        if module.split(".")[0] in NOT_SHIPPED
    ]
    assert offending == []


def _product_modules() -> dict[str, Path]:
    """Dotted name -> file of every product module (a package by its ``__init__``)."""
    modules = {}
    for path in _python_files(*PRODUCT):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _references(path: Path, modules: dict[str, Path]) -> set[str]:
    """Product modules ``path`` imports (with their parent packages) or names in a string (``-m fedcare.x``, preload lists)."""
    found = set()
    for module, _ in _imports(path):
        parts = module.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(node.value.replace("`", " ").split()) & modules.keys()
    return found


def test_every_product_module_is_reached_from_an_entry_point_not_only_from_tests_or_bench() -> None:
    """Code the product never reaches but tests or benchmarks import is support code shipped by mistake."""
    modules = _product_modules()
    entry_points = [
        PYPROJECT["project"]["scripts"]["fedcare"],
        *PYPROJECT["tool"]["flwr"]["app"]["components"].values(),
    ]
    reached, todo = set(), [entry.split(":")[0] for entry in entry_points]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(_references(modules[module], modules))
    outside = {m for path in _python_files(*NOT_SHIPPED) for m in _references(path, modules)}
    assert sorted(outside - reached) == []


def _allowed_in_tests(module: str) -> bool:
    """Tests share code through ``tests.support`` (and ``tests.conftest``), never a test module or ``bench``."""
    parts = module.split(".")
    if parts[0] != "tests":
        return parts[0] != "bench"
    return len(parts) == 1 or parts[1] in ("support", "conftest")


def test_tests_import_shared_code_only_from_tests_support() -> None:
    offending = {
        f"{path.relative_to(ROOT)}:{line}": module  # one entry per import statement
        for path in _python_files("tests")
        for module, line in reversed(list(_imports(path)))
        if not _allowed_in_tests(module)
    }
    assert offending == {}


def test_benchmarks_never_import_tests() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _python_files("bench")
        for module, line in _imports(path)
        if module.split(".")[0] == "tests"
    ]
    assert offending == []


def test_the_import_reader_sees_function_level_imports_and_the_rules_hold(tmp_path: Path) -> None:
    """The checks above cannot pass vacuously: a nested import is seen, and each rule tells right from wrong."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from tests.test_x import helper\n    import scipy.stats\n")
    assert list(_imports(module)) == [("os", 1), ("tests.test_x", 4), ("tests.test_x.helper", 4), ("scipy.stats", 5)]
    assert [m for m in ("tests.support.grid", "tests.conftest", "numpy", "tests") if not _allowed_in_tests(m)] == []
    assert [m for m in ("tests.test_x", "bench.bench_y", "bench") if _allowed_in_tests(m)] == []
    assert _declared("flwr[simulation]==1.41.0", "scikit-learn>=1.4", "tomli-w==1.2.0") == {
        "flwr",
        "scikit-learn",
        "tomli-w",
    }
