import tomllib

import pytest

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings
from tests.conftest import ROOT


def test_pyproject_run_config_defaults_equal_the_python_defaults():
    flwr_defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_defaults == RunSettings().to_config()
    assert RunSettings.from_config(flwr_defaults) == RunSettings()


@pytest.mark.parametrize("change,message", [
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"strategy": "scaffold"}, "unknown strategy 'scaffold'"),
    ({"target_epsilon": 0.0}, "target epsilon must be > 0"),
    ({"target_epsilon": -1.0}, "target epsilon must be > 0"),
    ({"delta": 1.0}, "delta must be in"),
    ({"num_rounds": 0}, "num-rounds must be >= 1"),
])
def test_bad_settings_are_refused_with_a_reason(change, message):
    with pytest.raises(FedcareError, match=message):
        RunSettings(**change)


def test_no_dp_ignores_epsilon():
    assert RunSettings(dp=False, target_epsilon=0.0).dp is False


def test_run_config_strings_are_coerced_and_unknown_keys_named():
    s = RunSettings.from_config({"num-rounds": "3", "dp": "false", "learning-rate": "0.5"})
    assert (s.num_rounds, s.dp, s.learning_rate) == (3, False, 0.5)
    with pytest.raises(FedcareError, match="unknown run-config key 'nmu-rounds'"):
        RunSettings.from_config({"nmu-rounds": 3})
    with pytest.raises(FedcareError, match="must be a int"):
        RunSettings.from_config({"num-rounds": "three"})
