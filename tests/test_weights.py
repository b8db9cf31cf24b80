import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord
from opacus import GradSampleModule
from opacus.layers import DPGRU

from shared_models.registry import build_model
from shared_models.weights import (
    load_arrays,
    model_to_arrays,
    pack_arrays,
    parameter_names,
    unpack_arrays,
    weights_digest,
)


def test_weights_travel_by_name_not_position():
    torch.manual_seed(0)
    source, target = build_model("mlp", 15), build_model("mlp", 15)
    arrays = model_to_arrays(source)
    shuffled = {name: arrays[name].numpy() for name in reversed(list(arrays.keys()))}
    load_arrays(target, shuffled)
    for (na, a), (nb, b) in zip(source.named_parameters(), target.named_parameters()):
        assert na == nb and torch.equal(a, b)
    assert weights_digest(model_to_arrays(target)) == weights_digest(arrays)


def test_opacus_wrapped_model_exports_plain_names():
    model = build_model("logistic", 15)
    wrapped = GradSampleModule(model)
    assert list(model_to_arrays(wrapped).keys()) == ["linear.weight", "linear.bias"]


def test_dpgru_exchanges_by_parameter_name():
    gru = DPGRU(4, 8, num_layers=2, batch_first=True)
    arrays = model_to_arrays(gru)
    assert list(arrays.keys()) == parameter_names(gru)
    other = DPGRU(4, 8, num_layers=2, batch_first=True)
    load_arrays(other, arrays)
    assert all(torch.equal(a, b) for a, b in zip(gru.parameters(), other.parameters()))


def test_mismatched_weights_are_named():
    model = build_model("logistic", 15)
    with pytest.raises(ValueError, match=r"missing \['linear.bias'\]"):
        load_arrays(model, {"linear.weight": np.zeros((1, 15), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"'linear.weight' has shape"):
        load_arrays(model, {"linear.weight": np.zeros((1, 3), np.float32), "linear.bias": np.zeros(1, np.float32)})


def test_packed_model_is_one_record_and_unpacks_to_the_same_weights():
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model("gru", (5, 7)))
    arrays["step"] = Array(np.arange(3, dtype=np.int64))
    packed = pack_arrays(arrays)
    assert list(packed.keys()) == list(arrays.keys())
    back = unpack_arrays(packed)
    assert weights_digest(back) == weights_digest(arrays)
    assert back["step"].numpy().dtype == np.int64


def test_corrupt_packed_weight_is_named():
    packed = pack_arrays(model_to_arrays(build_model("logistic", 15)))
    with pytest.raises(ValueError, match=r"'linear.bias' in the message is not a packed array"):
        unpack_arrays(ConfigRecord({**dict(packed), "linear.bias": packed["linear.bias"][:20]}))
    with pytest.raises(ValueError, match=r"'linear.weight' .*\(a str, not bytes\)"):
        unpack_arrays(ConfigRecord({**dict(packed), "linear.weight": "zeros"}))
