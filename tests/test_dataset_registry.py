"""The dataset registry is the one home of dataset facts: every consumer agrees with it."""

from __future__ import annotations

import pytest

from client.datasets import DataSource, dataset_task, num_hospitals
from client.datasets.fed_heart_disease import CENTERS
from client.node_config import NodeConfig
from fedcare.dataset_registry import GENERATED, REGISTRY, dataset_spec
from fedcare.errors import FedcareError
from fedcare.node_settings import DATA_KEYS
from fedcare.run_config import DATASET_PRESETS, DATASET_TASKS, RunSettings
from shared_models.registry import resolve_model
from simulation.generated_data import GENERATED_DATASETS, prepare_dataset


def test_every_consumer_reads_the_registry():
    assert set(DATASET_TASKS) == set(DATASET_PRESETS) == set(DATA_KEYS) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert DATASET_TASKS[name] == dataset_task(name) == spec.task
        assert DATA_KEYS[name] == (set(spec.required_keys), set(spec.optional_keys))
        resolve_model("auto", spec.task)  # every dataset has a default model
        assert RunSettings.for_dataset(name).replace(data_root="x").dataset == name
    assert GENERATED_DATASETS == GENERATED == ("pbc2", "synthetic-imaging", "synthetic-ct")


def test_the_bundled_hospital_count_is_the_loaders():
    assert num_hospitals("fed-heart-disease") == REGISTRY["fed-heart-disease"].hospitals == len(CENTERS)


def test_an_unknown_dataset_is_refused_with_the_known_ones():
    with pytest.raises(FedcareError) as caught:
        dataset_spec("mnist")
    assert "unknown dataset 'mnist'" in caught.value.problem
    assert "fed-heart-disease" in caught.value.hint
    with pytest.raises(FedcareError):
        RunSettings.for_dataset("mnist")


def test_generated_datasets_are_the_ones_a_simulation_can_write(tmp_path):
    with pytest.raises(FedcareError, match="not generated"):
        prepare_dataset("dicom", tmp_path, 2)
    assert all(REGISTRY[name].hospital_folders for name in GENERATED)


def test_one_builder_keeps_every_node_setting():
    """The node's data check, the ClientApp and the CLI build their DataSource the same way: nothing
    a hospital set (cache folder, DICOM handling, image size) is dropped on the way."""
    node_config = {
        "data-path": "/data/dicom",
        "labels": "/data/labels.csv",
        "cache-dir": "/var/cache/fedcare",
        "multiframe": "every",
        "require-deidentified": "false",
        "on-unreadable": "skip",
    }
    source = NodeConfig.read(node_config, {}, {}).data_source(image_size=96)
    assert source == DataSource(
        data_path="/data/dicom",
        labels="/data/labels.csv",
        cache_dir="/var/cache/fedcare",
        image_size=96,
        multiframe="every",
        require_deidentified=False,
        on_unreadable="skip",
    )
    assert NodeConfig.read(node_config, {}, {}).data_source().image_size == RunSettings().image_size
