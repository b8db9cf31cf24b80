"""A hospital's name without loading its data: the name every message is answered under must be the
one its loaded data carries, for every data layout, and a misconfigured node still gets the loader's
error."""

from __future__ import annotations

import pytest

from client.datasets import DataSource, hospital_name, load_hospital
from fedcare.errors import FedcareError
from simulation.generated_data import prepare_dataset


def _same(dataset: str, source: DataSource) -> None:
    assert hospital_name(dataset, source) == load_hospital(dataset, source).name


@pytest.mark.parametrize("partition", range(4))
def test_a_bundled_hospital_is_named_as_its_data(partition):
    _same("fed-heart-disease", DataSource(partition_id=partition))


@pytest.mark.parametrize(
    "dataset, layout", [("ehr-table", "synthetic-table"), ("pbc2", "pbc2"), ("synthetic-imaging", "synthetic-imaging")]
)
def test_a_hospital_folder_is_named_as_its_data(tmp_path, dataset, layout):
    prepare_dataset(layout, tmp_path / "sites", 2)
    _same(dataset, DataSource(partition_id=1, data_root=str(tmp_path / "sites"), cache_dir=str(tmp_path / "cache")))


def test_a_hospitals_own_table_is_named_as_its_data(tmp_path):
    folder = prepare_dataset("synthetic-table", tmp_path / "sites", 1)[0]
    _same("ehr-table", DataSource(data_path=str(folder / "table.csv"), schema=str(folder / "schema.toml")))


@pytest.mark.parametrize(
    "dataset, source, problem",
    [
        ("fed-heart-disease", DataSource(partition_id=7), "partition 7 does not exist"),
        ("fed-heart-disease", DataSource(), "no partition-id"),
        ("ehr-table", DataSource(partition_id=3, data_root="/nonexistent-fedcare-root"), "no hospital folder"),
        ("ehr-table", DataSource(), "needs its hospital folders"),
        ("ehr-table", DataSource(data_path="/data/table.csv"), "data-path or schema is not set"),
    ],
)
def test_a_misconfigured_node_gets_the_loaders_error_not_a_made_up_name(dataset, source, problem):
    with pytest.raises(FedcareError, match=problem) as named:
        hospital_name(dataset, source)
    with pytest.raises(FedcareError) as loaded:
        load_hospital(dataset, source)
    assert str(named.value) == str(loaded.value)
