"""fedcare.compat: every private API of Flower, Opacus and torch that fedcare uses, and its version gates.

Contract tests (``test_*_contract_*``) check that each private thing still exists with the expected
signature or behaviour on the installed version, so an upgrade fails here loudly. Gate tests
report an unverified version and check that the public fallback is chosen with exactly one warning.
None of these patches Flower in this process: the gates refuse before touching it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fedcare.compat
from fedcare.compat import flower as flower_compat
from fedcare.compat import opacus as opacus_compat
from fedcare.compat import torch as torch_compat
from fedcare.errors import FedcareError
from tests.conftest import ROOT
from tests.support.clipping_cases import dp_step


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_on(monkeypatch):
    """A fresh process's warn-once state; returns a function giving a logger's WARNING messages
    ("flwr": Flower's logger, "fedcare": the other gates') since the test began."""
    monkeypatch.setattr(fedcare.compat, "_warned", set())
    handlers = {name: _Records() for name in ("flwr", "fedcare")}
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    yield lambda name: handlers[name].messages
    for name, handler in handlers.items():
        logging.getLogger(name).removeHandler(handler)


def _unverified(messages: list[str], project: str) -> list[str]:
    return [m for m in messages if f"verified on {project}" in m]


# ---------------------------------------------------------------- Flower 1.41.0


def test_flower_contract_the_verified_version_is_installed():
    from flwr.supercore import version

    assert flower_compat.flower_version() == importlib.metadata.version("flwr") == str(version.package_version)
    assert flower_compat.flower_version() == flower_compat.PATCHED_FLOWER, (
        "Flower changed: re-verify fedcare.compat.flower"
    )
    assert flower_compat.flower_verified() and flower_compat.executor_supported()


def test_flower_contract_supernode_polling():
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2, "Flower's waits changed"
    assert loop.time is time or isinstance(loop.time, flower_compat._PromptClock)
    params = list(inspect.signature(loop._pull_and_store_message).parameters)
    assert params[:3] == ["state", "object_store", "node_config"]
    assert inspect.signature(loop._pull_and_store_message).return_annotation in ("int | None", int | None)


def test_flower_contract_object_pull_backoff():
    from flwr.supercore.inflatable import inflatable_utils as iu

    for function in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        assert "initial_backoff" in function.__kwdefaults__ and function.__kwdefaults__["backoff_cap"] == 10


def test_flower_contract_clientapp_runtime():
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as runtime

    assert list(inspect.signature(runtime.run_clientapp).parameters) == [
        "runtime_api_address",
        "token",
        "insecure",
        "certificates",
        "parent_pid",
        "runtime_dependency_install",
    ]
    assert list(inspect.signature(runtime.pull_task_input).parameters) == ["client"]
    install = runtime.install_from_fab
    if not isinstance(install, flower_compat._FabGuard):
        assert list(inspect.signature(install).parameters) == ["fab_file", "install_dir", "skip_prompt"]
    for name in ("get_load_client_app_fn", "push_message", "push_task_output"):
        assert callable(getattr(runtime, name))
    assert isinstance(APP_DIR, str) and FAB_HASH_TRUNCATION == 8 and callable(get_flwr_home)


def test_flower_contract_executor_runtime_api():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse  # pylint: disable=no-name-in-module
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    assert list(inspect.signature(RuntimeHttpClient.from_server_address).parameters)[:4] == [
        "server_address",
        "insecure",
        "root_certificates",
        "interceptors",
    ]
    assert callable(RuntimeHttpClient.AcquireTask)
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert {"task", "token"} <= set(AcquireTaskResponse.DESCRIPTOR.fields_by_name)
    task = AcquireTaskResponse.DESCRIPTOR.fields_by_name["task"].message_type
    assert {"task_id", "run_id"} <= set(task.fields_by_name)
    assert TaskType.CLIENT_APP and list(inspect.signature(RuntimeVersionHttpInterceptor).parameters) == [
        "component_name"
    ]
    assert list(inspect.signature(start_parent_process_monitor).parameters) == ["parent_pid"]


def test_flower_contract_fab_build():
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.utils import AppPathDepthError, build_pathspec, collect_files

    assert list(inspect.signature(build_fab_from_disk).parameters) == ["app"]
    assert list(inspect.signature(build_fab_from_files).parameters) == ["files"]
    assert list(inspect.signature(collect_files).parameters) == ["root"]
    assert build_pathspec(["*.py"]).match_file("a.py") and issubclass(AppPathDepthError, Exception)


def test_on_another_flower_every_hook_keeps_flowers_behaviour_with_one_warning(monkeypatch, warnings_on):
    from flwr.supercore.inflatable import inflatable_utils as iu

    monkeypatch.setattr(flower_compat, "flower_version", lambda: "1.42.0")
    backoff = dict(iu.pull_objects.__kwdefaults__)
    assert not flower_compat.shorten_object_pull_backoff()
    assert not flower_compat.patch_supernode_polling(0.2)
    assert not flower_compat.on_message_stored(lambda: None)
    assert not flower_compat.reuse_installed_fab()
    assert not flower_compat.guard_fab_install(lambda *a, **k: None)
    assert not flower_compat.executor_supported()
    assert iu.pull_objects.__kwdefaults__ == backoff  # nothing patched
    warned = _unverified(warnings_on("flwr"), "Flower")
    assert len(warned) == 1 and "1.41.0" in warned[0] and "1.42.0" in warned[0] and "no warm executor" in warned[0]


def test_node_launcher_picks_the_executor_by_flower_version(monkeypatch, warnings_on):
    from fedcare.fab_approval import FabPolicy
    from fedcare.node_launcher import choose_executor

    policy = FabPolicy(store=None, digests=frozenset())
    assert choose_executor(True, None) == "warm" and choose_executor(False, policy) == "cold"
    assert choose_executor(False, None) is None
    monkeypatch.setattr(flower_compat, "flower_version", lambda: "1.42.0")
    assert choose_executor(True, None) is None and choose_executor(True, policy) is None
    assert len(_unverified(warnings_on("flwr"), "Flower")) == 1


def test_on_another_flower_the_warm_node_runs_flowers_own_clientapp_processes(monkeypatch, warnings_on):
    """--warm-clientapp (with --allow-any-fab: approval cannot run there) -> plain Flower, no --isolation process."""
    from fedcare import node_launcher

    entry = importlib.import_module("flwr.supernode.cli.flower_supernode")
    started, ran = [], []
    monkeypatch.setattr(node_launcher, "start_executor", lambda *a, **k: started.append((a, k)))
    monkeypatch.setattr(entry, "flower_supernode", lambda: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(flower_compat, "flower_version", lambda: "1.42.0")
    node_launcher.main(
        [
            "--warm-clientapp",
            "--poll-interval",
            "0.5",
            "--allow-any-fab",
            "--",
            "--insecure",
            "--superlink",
            "127.0.0.1:1",
        ]
    )
    assert started == [] and len(ran) == 1
    assert "--isolation" not in ran[0] and ran[0][1:] == ["--insecure", "--superlink", "127.0.0.1:1"]
    warned = _unverified(warnings_on("flwr"), "Flower")
    assert len(warned) == 1 and "no warm executor" in warned[0]


def test_on_the_verified_flower_the_warm_node_starts_fedcares_executor(monkeypatch):
    from fedcare import node_launcher

    entry = importlib.import_module("flwr.supernode.cli.flower_supernode")
    started, ran = [], []
    monkeypatch.setattr(node_launcher, "start_executor", lambda *a, **k: started.append((a, k)))
    monkeypatch.setattr(entry, "flower_supernode", lambda: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    node_launcher.main(["--warm-clientapp", "--allow-any-fab", "--", "--insecure", "--port", "9311"])
    assert started == [(("127.0.0.1:9311", None), {"warm": True})]
    assert ran[0][-2:] == ["--isolation", "process"]


# ---------------------------------------------------------------- Opacus 1.6.0


def test_opacus_contract_private_helpers_and_state():
    from opacus.optimizers import DPOptimizerFastGradientClipping

    assert opacus_compat.opacus_version() == opacus_compat.VERIFIED_OPACUS, (
        "Opacus changed: re-verify fedcare.compat.opacus"
    )
    used = torch.zeros(3)
    opacus_compat.check_processed_flag(used)  # fresh: passes
    opacus_compat.mark_as_processed(used)
    with pytest.raises(ValueError):
        opacus_compat.check_processed_flag(used)  # used once already
    model = nn.Linear(2, 1)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2
    )
    assert opacus_compat.last_step_skipped(optimizer) is False
    assert opacus_compat.noise_multiplier_in_use(optimizer) == 1.0
    order = inspect.getsource(DPOptimizerFastGradientClipping.pre_step)
    calls = [order.index(f"self.{name}()") for name in ("accumulate", "add_noise", "scale_grad")]
    assert calls == sorted(calls) and "self.step_hook(self)" in order
    assert "secure_mode" in inspect.signature(DPOptimizerFastGradientClipping.__init__).parameters


def test_on_another_opacus_dp_sgd_uses_opacuss_public_step_with_one_warning(monkeypatch, warnings_on):
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from client.dp_optimizer import ClippedSumDPOptimizer, make_dp_optimizer
    from client.secret_randomness import SecretRandom
    from shared_models.registry import build_model

    torch.manual_seed(0)
    model = build_model("mlp", 5, hidden_units=4)
    x, y = torch.randn(8, 5), torch.ones(8)
    assert (
        type(
            make_dp_optimizer(
                torch.optim.SGD(model.parameters(), lr=1.0),
                noise=SecretRandom(),
                noise_multiplier=0.0,
                max_grad_norm=1.0,
                expected_batch_size=4,
            )
        )
        is ClippedSumDPOptimizer
    )
    monkeypatch.setattr(opacus_compat, "opacus_version", lambda: "1.7.0")
    optimizers = [
        make_dp_optimizer(
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise=SecretRandom(),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
        for _ in range(2)
    ]
    for optimizer in optimizers:
        assert type(optimizer) is DPOptimizerFastGradientClipping
        assert optimizer.secure_mode and optimizer.generator is not None  # noise from the secret stream's seed
    before = [p.detach().clone() for p in model.parameters()]
    sums = dp_step(optimizers[0], model, x, y)
    for b, s, p in zip(before, sums, model.parameters()):
        torch.testing.assert_close(p.detach(), b - s / 4)  # the same DP-SGD update
    warned = _unverified(warnings_on("fedcare"), "Opacus")
    assert len(warned) == 1 and "1.6.0" in warned[0] and "1.7.0" in warned[0]
    with pytest.raises(FedcareError, match=r"verified on Opacus 1\.6\.0, this is Opacus 1\.7\.0"):
        ClippedSumDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
        )


# ---------------------------------------------------------------- torch 2.13.x


def test_torch_contract_engine_edges_and_reference_counts():
    assert torch_compat.torch_verified(), "torch changed: re-verify fedcare.compat.torch"
    internals = torch_compat.clipping_internals()
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    hidden = layer(x)
    loss = hidden.tanh().sum()
    edge = internals.edge(hidden)
    public = torch.autograd.graph.get_gradient_edge(hidden)
    assert edge.node is public.node and edge.output_nr == public.output_nr
    assert isinstance(torch._C._FunctionBase, type)
    (fast,) = internals.grads_to(loss, (edge,))
    hidden2 = layer(x)
    (expected,) = torch.autograd.grad(hidden2.tanh().sum(), (torch.autograd.graph.get_gradient_edge(hidden2),))
    torch.testing.assert_close(fast, expected)
    flat = torch.zeros(6)
    views = [flat[:2], flat[2:]]
    counts = internals.reference_counts(flat, views)
    kept = views[0]  # noqa: F841 - another reference, as an optimizer still holding a gradient
    assert internals.reference_counts(flat, views)[1] == counts[1] + 1


def _clipped_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2):
    from client.per_sample_clipping import PerSampleClipper

    clipper = PerSampleClipper(model, 1.0)
    grads, buffers = [], []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        with clipper.recording():
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
        clipper.clip_and_sum(loss, len(y))
        grads.append([p.grad.clone() for p in model.parameters()])
        buffers.append(id(clipper._buffer[0]))
    clipper.close()
    return grads, buffers


def test_on_another_torch_clipping_uses_torchs_public_api_with_one_warning(monkeypatch, warnings_on):
    from shared_models.registry import build_model

    torch.manual_seed(0)
    model = build_model("mlp", 5, hidden_units=4)
    x, y = torch.randn(8, 5), torch.ones(8)
    verified, reused = _clipped_grads(model, x, y)
    assert reused[0] == reused[1]  # the buffer is reused on torch 2.13
    monkeypatch.setattr(torch_compat, "torch_version", lambda: "2.14.0")
    internals = torch_compat.clipping_internals()
    assert internals.reference_counts is None and internals.edge is torch.autograd.graph.get_gradient_edge
    public, _ = _clipped_grads(model, x, y)
    for a, b in zip(verified, public):
        for g, h in zip(a, b):
            torch.testing.assert_close(g, h)  # the same clipped sums
    warned = _unverified(warnings_on("fedcare"), "torch")
    assert len(warned) == 1 and "2.13.x" in warned[0] and "2.14.0" in warned[0]


# ---------------------------------------------------------------- one place


PRIVATE_USES = re.compile(
    r"_check_processed_flag|_mark_as_processed|_is_last_step_skipped|_adjusted_noise_multiplier"
    r"|_execution_engine|getrefcount|_FunctionBase|RuntimeHttpClient|AcquireTaskRequest"
    r"|start_parent_process_monitor|runtime\.run_clientapp\(|inflatable_utils"
    r"|start_client_internal|install_from_fab"
)


def _code_without_docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_private_apis_are_used_only_in_fedcare_compat():
    offenders = []
    for path in (
        "fedcare/warm_clientapp.py",
        "fedcare/node_launcher.py",
        "client/dp_optimizer.py",
        "client/per_sample_clipping.py",
        "client/dp_trainer.py",
    ):
        code = _code_without_docstrings(ROOT / path)
        offenders += [f"{path}: {line.strip()}" for line in code.splitlines() if PRIVATE_USES.search(line)]
    assert not (ROOT / "fedcare" / "flower_latency.py").exists()
    assert not offenders, offenders
