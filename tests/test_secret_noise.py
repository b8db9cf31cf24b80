"""The coordinator cannot reproduce a hospital's DP noise: it comes from the hospital's OS entropy.

Attacks from the review, written as tests: (1) the statistics answer's noise was
``np.random.default_rng(seed * 1000 + partition-id)``, so the server subtracted it and read the exact
feature sums; (2) training seeded torch's generator from the run seed, so two runs with the same
seed released the same noise (and the server could replay it). Here every message a server could
send is sent twice, identically; what comes back differs by the noise, and replaying the old
seed derivation leaves a residual of the order of the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import make_client_app
from client.datasets.fed_heart_disease import load_center
from client.feature_stats import local_sums, sensitivity
from client.secret_randomness import SecretPoissonBatches, SecretRandom
from fedcare import protocol
from fedcare.run_config import RunSettings
from server.federation_loop import training_config
from shared_models.registry import build_model
from shared_models.weights import model_to_arrays, pack_arrays

RUN_ID = 77
PARTITION = 0  # Cleveland
NODE = {"partition-id": PARTITION, "epsilon-budget": 50.0, "require-secure-aggregation": False, "min-hospitals": 2}


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


def _ask(ledger_dir, message_type: str, config: dict, model=None) -> Message:
    """One message to a fresh hospital process-state (its own ledger folder), as the server sends it."""
    app = make_client_app()
    context = Context(RUN_ID, 100, {**NODE, "ledger-dir": str(ledger_dir)}, RecordDict(), {})
    content = {protocol.CONFIG: ConfigRecord(config)}
    if model is not None:
        content[protocol.MODEL] = pack_arrays(model)
    return app(Message(RecordDict(content), dst_node_id=100, message_type=message_type), context)


def _settings() -> RunSettings:
    return RunSettings(seed=3, target_epsilon=8.0, secure_aggregation=False, num_rounds=2)


def test_the_same_statistics_request_twice_gets_different_noise_and_seed_replay_recovers_nothing(tmp_path):
    s = _settings()
    config = training_config(s)
    answers = [
        np.asarray(
            _ask(tmp_path / f"h{i}", protocol.FEATURE_STATS, config).content.metric_records[protocol.METRICS]["sum"]
        )
        for i in range(2)
    ]
    data = load_center(PARTITION)
    exact = np.asarray(local_sums(data.per_patient_numeric(data.x_train), data.numeric_bounds(), None, None)["sum"])
    from client.privacy_ledger import PrivacyLedger

    ledger_file = next((tmp_path / "h0").glob("privacy-ledger-*.json"))
    import json

    stats_sigma = PrivacyLedger(ledger_file, json.loads(ledger_file.read_text())).history[0][0]
    noise_std = stats_sigma * sensitivity(len(exact))
    # the attack: the noise today's code drew from the coordinator's seed, subtracted from the answer
    replayed = np.random.default_rng(s.seed * 1000 + PARTITION).normal(0.0, noise_std, size=exact.shape)
    residual = answers[0] - replayed - exact
    assert np.sqrt(np.mean(residual**2)) > 0.1 * noise_std  # of the order of the noise, not ~0
    difference = answers[0] - answers[1]
    assert np.sqrt(np.mean(difference**2)) > 0.1 * noise_std  # two identical requests: fresh noise each


def test_the_same_train_request_twice_releases_updates_that_differ_by_the_noise(tmp_path):
    s = _settings()
    data = load_center(PARTITION)
    k = len(data.numeric_features)
    config = training_config(s) | {"server-round": 1, "norm-mean": [0.0] * k, "norm-std": [1.0] * k}
    model = model_to_arrays(build_model("logistic", data.input_shape))
    # four pairs of releases: the model has 16 values, and the spread of one pair's 16 differences
    # alone falls outside the bounds below in about one run in twenty
    replies = [_ask(tmp_path / f"h{i}", "train", config, model) for i in range(8)]
    updates = [np.concatenate([a.numpy().ravel() for a in r.content[protocol.ARRAYS].values()]) for r in replies]
    report = replies[0].content.config_records[protocol.HOSPITAL]
    sigma, steps = report[f"{protocol.TRAINED}noise-multiplier"], report[f"{protocol.TRAINED}steps"]
    n = len(data.y_train)
    expected_batch = n // steps  # Opacus's expected batch size: int(n * 1 / steps)
    # each step adds lr * N(0, (sigma C)^2) / B per value: over `steps` steps, per release
    per_release = s.learning_rate * sigma * s.max_grad_norm * np.sqrt(steps) / expected_batch
    spread = np.std(np.concatenate([updates[i] - updates[i + 1] for i in range(0, len(updates), 2)]))
    # Poisson batches come from the secret stream too and add ~25-30 % to the spread: the upper bound is wide.
    assert 0.5 * np.sqrt(2) * per_release < spread < 3.0 * np.sqrt(2) * per_release, (spread, per_release)


def test_secret_streams_are_fresh_and_only_the_reproducible_switch_repeats():
    a, b = SecretRandom(), SecretRandom()
    assert a.private and b.private
    assert not np.array_equal(a.standard_normal(64), b.standard_normal(64))
    r1, r2 = SecretRandom.reproducible(5, "x"), SecretRandom.reproducible(5, "x")
    assert not r1.private
    assert np.array_equal(r1.standard_normal(1000), r2.standard_normal(1000))
    assert not np.array_equal(
        SecretRandom.reproducible(5, "y").standard_normal(8), SecretRandom.reproducible(5, "x").standard_normal(8)
    )


def test_gaussian_and_uniform_streams_have_the_right_distribution():
    rng = SecretRandom.reproducible(1, "distribution")
    z = np.concatenate([rng.standard_normal(7) for _ in range(20_000)])  # many small draws, across refills
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.004  # the tails of N(0, 1)
    u = rng.uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.003


def test_poisson_batches_take_exactly_the_planned_steps_including_empty_ones():
    import torch

    x, y = torch.arange(40.0).reshape(40, 1), torch.zeros(40)
    # 40 examples, batch 13 -> 4 steps an epoch at rate 1/4; Opacus's loader would take int(1/(1/k))
    batches = list(SecretPoissonBatches(x, y, 1 / 4, 4, SecretRandom.reproducible(0, "p")))
    assert len(batches) == 4
    sizes = [
        len(b[1])
        for b in SecretPoissonBatches(torch.zeros(3, 1), torch.zeros(3), 0.1, 500, SecretRandom.reproducible(0, "q"))
    ]
    assert len(sizes) == 500 and sizes.count(0) > 300  # empty batches are steps too


def test_reproducible_noise_is_reported_as_not_private_by_every_hospital(tmp_path):
    from server.federation_loop import run_federation
    from server.run_report import write_report
    from tests.support.inprocess_grid import InProcessGrid, node_configs

    s = RunSettings(num_rounds=1, secure_aggregation=False, output_dir=str(tmp_path / "out"))
    seeded = run_federation(
        InProcessGrid(node_configs(tmp_path / "a", [5.0] * 4), run_id=RUN_ID, reproducible_noise=1),
        s,
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    assert all(not h.private_noise for h in seeded.hospitals.values())
    assert write_report(s.output_dir, s, seeded, str(RUN_ID))["private"] is False
    secret = run_federation(
        InProcessGrid(node_configs(tmp_path / "b", [5.0] * 4), run_id=RUN_ID),
        s,
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    assert all(h.private_noise and h.delta == 1e-4 for h in secret.hospitals.values())
