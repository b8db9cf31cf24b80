import tomllib

import pytest

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings, personalise_lr_scale
from tests.conftest import ROOT


def test_pyproject_run_config_defaults_equal_the_python_defaults():
    flwr_defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_defaults == RunSettings().to_config()
    assert RunSettings.from_config(flwr_defaults) == RunSettings()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"strategy": "scaffold"}, "unknown strategy 'scaffold'"),
        ({"target_epsilon": 0.0}, "target epsilon must be > 0"),
        ({"target_epsilon": -1.0}, "target epsilon must be > 0"),
        ({"delta": 1.0}, "delta must be in"),
        ({"num_rounds": 0}, "num-rounds must be >= 1"),
    ],
)
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


# Run settings that a hint or refusal tells the user to change, and where (file: what it says)
HINTED_SETTINGS = {
    "secagg_clip_range": "secure_aggregation/quantization.py, client/node_policy.py: set/lower secagg-clip-range",
    "secagg_threshold": "server/secure_rounds.py: lower secagg-threshold",
    "secure_aggregation": "server/secure_rounds.py, client/node_policy.py: secure-aggregation=false",
    "batch_size": "client/datasets/hospital_data.py: lower batch-size",
    "target_epsilon": "fedcare/run_config.py, client/node_policy.py: --epsilon / target-epsilon",
    "dp": "fedcare/run_config.py, client/node_policy.py: --no-dp / dp=false",
    "hospitals": "client/node_policy.py, server/federation_loop.py: hospitals / the expected hospital count",
    "min_hospitals": "server/federation_loop.py: min-hospitals",
    "num_rounds": "client/privacy_ledger.py: plan fewer rounds",
    "image_size": "client/datasets/dicom_reader.py: set --image-size",
    "model": "shared_models/registry.py: use model auto or ...",
    "delta": "fedcare/run_config.py: use a delta well below 1/n",
    "stats_budget_fraction": "fedcare/run_config.py: stats-budget-fraction must be in (0, 1)",
    "max_grad_norm": "fedcare/run_config.py: max-grad-norm must be > 0",
    "learning_rate": "fedcare/run_config.py: learning-rate must be > 0",
    "server_learning_rate": "fedcare/run_config.py: server-learning-rate must be > 0",
    "proximal_mu": "fedcare/run_config.py: proximal-mu must be >= 0",
    "weight_decay": "fedcare/run_config.py: weight-decay must be >= 0",
    "ledger_dir": "client/privacy_ledger.py: set ledger-dir",
    "output_dir": "server/checkpoint.py: resume with the output-dir",
    "data_root": "client/datasets/__init__.py: give --data-root",
}


@pytest.mark.parametrize("name", sorted(HINTED_SETTINGS))
def test_a_hinted_setting_names_both_its_simulate_option_and_its_run_config_key(name):
    from fedcare.run_config import how_to_set, simulate_option

    assert name in RunSettings.__dataclass_fields__
    option = simulate_option(name)
    assert option.startswith("--") and option in how_to_set(name)
    assert f"run-config {name.replace('_', '-')}" in how_to_set(name)


@pytest.mark.parametrize(
    "change,message,option",
    [
        ({"secagg_clip_range": 0.0}, "secagg-clip-range must be > 0", "--secagg-clip-range"),
        ({"secagg_threshold": -1}, "secagg-threshold must be >= 0", "--secagg-threshold"),
        ({"num_rounds": 0}, "num-rounds must be >= 1", "--rounds"),
        ({"stats_budget_fraction": 1.0}, "stats-budget-fraction must be in (0, 1)", "--stats-budget-fraction"),
        ({"proximal_mu": -1.0}, "proximal-mu must be >= 0", "--proximal-mu"),
    ],
)
def test_a_bad_setting_says_how_to_set_it_in_simulate_and_in_a_deployed_run(change, message, option):
    with pytest.raises(FedcareError) as err:
        RunSettings(**change)
    key = next(iter(change)).replace("_", "-")
    assert message in err.value.problem
    assert option in err.value.hint and f"run-config {key}" in err.value.hint


def _hint_of(raise_it) -> str:
    with pytest.raises(Exception) as err:
        raise_it()
    return err.value.hint


def _secure_rounds_with_one_hospital():
    from flwr.app import ArrayRecord

    from server.secure_rounds import SecureAggregation

    SecureAggregation(None, {}, 0, 1.0, 1.0, print).setup([1], 1, ArrayRecord())


def _quantizer_without_a_range():
    from secure_aggregation import Quantizer

    Quantizer(0.0)


def _a_sequence_model_for_a_table():
    from shared_models.registry import resolve_model

    resolve_model("gru", "tabular")


def _a_plain_sgd_batch_larger_than_a_hospital():
    from client.datasets.fed_heart_disease import load_center

    load_center(2).check_trainable(batch_size=64, dp=False)


@pytest.mark.parametrize(
    "raise_it,names",
    [
        (_secure_rounds_with_one_hospital, ["secagg_threshold", "secure_aggregation"]),
        (_a_plain_sgd_batch_larger_than_a_hospital, ["batch_size"]),
        (_quantizer_without_a_range, ["secagg_clip_range"]),
        (_a_sequence_model_for_a_table, ["model"]),
    ],
)
def test_product_hints_name_the_simulate_option_and_the_run_config_key(raise_it, names):
    from fedcare.run_config import simulate_option

    hint = _hint_of(raise_it)
    for name in names:
        option = simulate_option(name).split("/")[-1]
        assert f"`fedcare simulate {option}`" in hint and f"run-config {name.replace('_', '-')}" in hint, hint


def test_personalisation_fine_tunes_more_gently_under_dp_unless_told():
    """personalise-lr-scale 0 (the default) is 0.3 of the learning rate with DP and 1.0 without (the
    cross-table choice); a scale the coordinator sets is kept; a negative one is refused."""
    assert RunSettings().personalise_lr_scale == 0.0
    assert personalise_lr_scale(0.0, dp=True) == 0.3 and personalise_lr_scale(0.0, dp=False) == 1.0
    assert personalise_lr_scale(0.5, dp=True) == 0.5 and personalise_lr_scale(2.0, dp=False) == 2.0
    with pytest.raises(FedcareError, match="personalise-lr-scale must be >= 0"):
        RunSettings(personalise_lr_scale=-0.1)
