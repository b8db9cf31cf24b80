"""Segmentation as a run task: who may ask for it, what a hospital's test reports (Dice, HD95 and
lesion detection, as sums that merge across hospitals), and how the final table shows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.dp_trainer import DPSettings, local_optimizer, train
from client.secret_randomness import SecretRandom
from client.segmentation_scores import segmentation_summary
from fedcare import wire
from fedcare.dataset_registry import model_input_kind
from fedcare.errors import FedcareError
from fedcare.protocol import RunRequest
from fedcare.results_table import build_table
from fedcare.run_config import RunSettings
from server.federation_loop import training_config
from shared_models.registry import resolve_model


def test_segment_runs_on_volumes_with_the_unet_and_reaches_the_hospital_in_the_request():
    s = RunSettings.for_dataset("synthetic-ct", task="segment")
    assert resolve_model(s.model, model_input_kind("volume", s.task)) == "unet3d"
    assert s.local_optimizer == "adam"  # the segmentation preset: plain SGD leaves the U-Net at a fixed blob
    request = RunRequest.from_config(training_config(s))
    assert (request.task, request.local_optimizer, request.model) == ("segment", "adam", "auto")
    assert RunSettings.for_dataset("synthetic-ct").task == "classify"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "fed-heart-disease", "task": "segment"}, "task 'segment' needs volume data"),
        ({"dataset": "synthetic-ct", "task": "detect"}, "unknown task 'detect'"),
        ({"dataset": "synthetic-ct", "task": "segment", "model": "cnn3d"}, "model 'cnn3d' trains on volume data"),
        ({"dataset": "synthetic-ct", "model": "unet3d"}, "model 'unet3d' trains on segmentation data"),
        ({"dataset": "synthetic-ct", "local_optimizer": "rmsprop"}, "unknown local optimizer 'rmsprop'"),
    ],
)
def test_a_task_or_optimizer_that_cannot_run_is_refused_with_the_fix(changes, message):
    with pytest.raises(FedcareError, match=message) as refused:
        RunSettings(**changes)
    assert refused.value.hint


def _volume(*boxes: tuple[slice, slice, slice]) -> np.ndarray:
    v = np.zeros((1, 12, 12, 8), dtype=np.float32)
    for box in boxes:
        v[(0, *box)] = 1.0
    return v


LESION = (slice(3, 6), slice(3, 6), slice(2, 5))
ELSEWHERE = (slice(8, 10), slice(8, 10), slice(5, 7))


def test_dice_hd95_and_detection_count_what_the_model_found_missed_and_invented():
    masks = np.stack([_volume(LESION), _volume(LESION), _volume()])
    probs = np.stack([_volume(LESION) * 0.9, _volume() + 0.1, _volume(ELSEWHERE) * 0.8])
    m = segmentation_summary(probs, masks, loss_sum=3.0).metrics()
    assert m["dice"] == pytest.approx(0.5)  # found (1) and missed (0); the lesion-free study has no Dice
    assert m["hd95"] == pytest.approx(0.0)  # over the one study where both mark voxels
    assert (m["n"], m["recall"], m["specificity"]) == (3, 0.5, 0.0)  # one lesion missed, one invented
    shifted = np.stack([_volume((slice(5, 8), slice(3, 6), slice(2, 5))) * 0.9])
    far = segmentation_summary(shifted, masks[:1], 0.0).metrics()
    assert 0 < far["dice"] < 1 and far["hd95"] == pytest.approx(2.0)  # two voxels off along x


def test_segmentation_figures_cross_the_wire_and_pool_as_exact_sums():
    masks = np.stack([_volume(LESION), _volume(LESION), _volume()])
    probs = np.stack([_volume(LESION) * 0.9, _volume((slice(3, 6), slice(3, 6), slice(2, 3))) * 0.7, _volume()])
    a, b = segmentation_summary(probs[:2], masks[:2], 1.0), segmentation_summary(probs[2:], masks[2:], 0.5)
    received = []
    for part in (a, b):
        record = wire.EvaluationMetrics.from_summary(part).to_record()
        received.append(wire.EvaluationMetrics.from_record(record).summary())
    assert (received[0] + received[1]).metrics() == pytest.approx(segmentation_summary(probs, masks, 1.5).metrics())
    assert "dice" not in received[1].metrics()  # no lesion study at b: no Dice of its own
    classification = wire.EvaluationMetrics.from_summary(a).to_record()
    classification = {k: v for k, v in classification.items() if not k.startswith(("dice", "hd95"))}
    assert "dice" not in wire.EvaluationMetrics.from_record(classification).summary().metrics()


def test_the_final_table_shows_dice_for_a_segmentation_run():
    fed = {"dice": 0.71, "hd95": 1.5, "auc": 0.9, "accuracy": 0.8, "n": 40}
    row = {"name": "hospital-0", "train_n": 90, "test_n": 40, "fed": fed, "local": {**fed, "dice": 0.42}}
    table = build_table([row], {"name": "pooled", "fed": fed}, dp=True)
    headers = [str(c.header) for c in table.columns]
    assert "fed\nDice" in headers and "local\nDice" in headers and "fed\nacc" not in headers
    cells = {str(c.header): list(c._cells) for c in table.columns}
    assert cells["fed\nDice"][0] == "0.710" and cells["local\nDice"][0] == "0.420"


def test_dp_adam_steps_on_the_noisy_clipped_gradient_and_counts_every_step():
    """The optimizer choice changes the update rule, never what is released or counted."""
    assert isinstance(local_optimizer("adam", torch.nn.Linear(2, 1), 0.01, 0.0), torch.optim.Adam)
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    counted = {}
    for name in ("sgd", "adam"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
        before = [p.detach().clone() for p in model.parameters()]
        outcome = train(
            model, x, y, epochs=3, batch_size=16, lr=0.05, dp=DPSettings(1.0, 1.0),
            rng=SecretRandom(), optimizer_name=name,
        )  # fmt: skip
        counted[name] = outcome.steps
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert counted["adam"] == counted["sgd"] and len(counted["adam"]) >= 1
    assert sum(steps for *_, steps in counted["adam"]) == 12  # 3 epochs x 4 batches, each one accounted


def test_a_segmentation_run_charges_the_ledger_a_classification_run_on_that_data_charges():
    """The privacy ledger is the hospital's data's, whatever a run learns from it: masks and labels
    describe the same patients, so their epsilon adds up."""
    from flwr.app import Context, RecordDict

    from client.client_app import _Node
    from client.datasets import HospitalData

    node_config = {"partition-id": 0, "data-root": "hospitals", "epsilon-budget": 8.0}
    identities = set()
    for task, kind, y in (("classify", "volume", np.zeros(4)), ("segment", "segmentation", np.zeros((4, 1, 4, 4, 4)))):
        request = training_config(RunSettings.for_dataset("synthetic-ct", task=task))
        node = _Node(Context(1, 5, node_config, RecordDict(), {}), request, {})
        x = np.zeros((4, 1, 4, 4, 4), dtype=np.float32)
        data = HospitalData("hospital-0", [], [], {}, x, y, x, y, task=kind)
        identities.add(node.dataset_id(data))
    assert identities == {"synthetic-ct:hospital-0"}
