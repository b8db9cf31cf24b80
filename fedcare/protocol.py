"""What both sides of the wire agree on: message types, record keys, and the typed run request.

The requests and replies built from these keys are typed dataclasses in ``fedcare.wire``: the
ClientApp and the round loop use those, never the keys below directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedcare.config_values import typed
from fedcare.errors import FedcareError

# a key a request leaves out means the run default
from fedcare.run_config import RUN_DEFAULTS as _RUN
from fedcare.run_config import PatchPlan

FEATURE_STATS = "query.feature_stats"  # message type of the federated statistics round
ARRAYS = "arrays"  # ArrayRecord: a plain train reply's update
MODEL = "model"  # ConfigRecord in train/evaluate messages: the global model, shared_models.weights.pack_arrays
CONFIG = "config"
METRICS = "metrics"
HOSPITAL = "hospital"  # ConfigRecord in every reply: {"name": hospital name}
REFUSAL = "refusal"  # ConfigRecord in a reply that declines: {"reason": ..., "kind": "budget"|"policy"|"ledger"|"data"}
NUM_EXAMPLES = "num-examples"
EVALUATE_INCOMING = "evaluate-incoming"  # train config flag: test the received model before training on it
PERSONALISED_EPSILON = "personalised-epsilon"  # ...and the hospital's epsilon after personalising
PERSONALISED = (
    "personalised/"  # key prefix, in a final evaluate reply's hospital record: the personalised model's test metrics
)
EVALUATION = "evaluation/"  # key prefix, in such a train reply's hospital record: the received model's test metrics
# In an evaluate reply's hospital record: the hospital's policy releases no evaluation (release-evaluation = "none")
EVALUATION_WITHHELD = "evaluation-withheld"
# Key prefix, in a train reply's hospital record: the hospital's own report on its training
# (train-seconds; with DP epsilon, noise-multiplier, steps). Not in the MetricRecord, which holds
# only what the strategy aggregates (num-examples, and train-loss without DP or secure aggregation).
TRAINED = "trained/"

# Secure aggregation (see secure_aggregation/ and server/secure_rounds.py)
SECAGG_ADVERTISE = "query.secagg_advertise"  # setup 1: node's signed public keys
SECAGG_SHARE_KEYS = "query.secagg_share_keys"  # setup 2: check every member's keys, deal first mask key
SECAGG_VIEW = "query.secagg_view"  # a round with dropouts: sign one view of the survivors
SECAGG_UNMASK = "query.secagg_unmask"  # per round: reveal shares (fast path or consistency path)
SECAGG_END = "query.secagg_end"  # the run is over: delete private key material
# A (flattened) protocol payload rides under this key prefix in the message's config record (server
# -> node) and in the reply's hospital record (node -> server): every record is one more request
# per node and message at the SuperLink, so none is added for it.
# The masked update too, as bytes (``secure_aggregation.records.pack_vector``) under "secagg/masked":
# a secure train reply is the hospital record alone.
SECAGG = "secagg/"


# ---- the run request every message carries (server -> node), typed -----------------------------
@dataclasses.dataclass(frozen=True)
class RunRequest:
    """What the coordinator asks of a hospital in every message's config record.

    Encoded and decoded here only (``to_config``/``from_config``): run-config keys are the field
    names with ``-`` for ``_``. Everything in it is a *request*: a node checks it against its own
    policy (``client/node_policy.py``) and never takes a privacy setting from it unchecked.
    """

    dataset: str
    task: str = _RUN["task"]  # classify (a label per patient) or segment (a mask per volume)
    model: str = _RUN["model"]
    hidden_units: int = _RUN["hidden_units"]
    num_rounds: int = 1
    local_epochs: int = _RUN["local_epochs"]
    personalise_rounds: int = 0  # not asked for: no local fine-tuning, and none planned
    personalise_lr_scale: float = _RUN["personalise_lr_scale"]  # their learning rate: this x learning_rate
    batch_size: int = _RUN["batch_size"]
    learning_rate: float = _RUN["learning_rate"]
    local_optimizer: str = _RUN["local_optimizer"]
    patch_size: str = _RUN["patch_size"]  # "" whole volumes; "XxYxZ": patches, a study's patches one DP sample
    patches_per_study: int = _RUN["patches_per_study"]
    weight_decay: float = _RUN["weight_decay"]
    proximal_mu: float = 0.0  # only FedProx sets it
    dp: bool = _RUN["dp"]
    target_epsilon: float = _RUN["target_epsilon"]
    delta: float = _RUN["delta"]
    max_grad_norm: float = _RUN["max_grad_norm"]
    stats_budget_fraction: float = _RUN["stats_budget_fraction"]
    seed: int = _RUN["seed"]  # model initialisation and simulated splits only: never noise
    image_size: int = _RUN["image_size"]
    secure_aggregation: bool = _RUN["secure_aggregation"]
    secagg_clip_range: float = _RUN["secagg_clip_range"]
    hospitals: int = 0  # how many hospitals the coordinator says the federation has
    plan_run_id: str = ""  # the run whose privacy plan this one continues (resume)
    server_round: int = 0  # set by Flower's strategies in train/evaluate messages

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunRequest:
        """Decode a message's config record (unknown keys are other protocol parts' and are ignored)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                kind = f.type if isinstance(f.type, str) else f.type.__name__
                values[f.name] = _typed(key, kind, config[key])
        return cls(**values)

    def patch_plan(self) -> PatchPlan | None:
        """The patches a segmentation step trains on (a malformed request is refused here); None: whole volumes."""
        return PatchPlan.parse(self.patch_size, self.patches_per_study)

    def to_config(self) -> dict[str, Any]:
        return {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "server_round"
        }


def _typed(key: str, kind: str, raw: Any) -> Any:
    """A run-request value as its field's type; a value that is not one is refused, never guessed."""
    try:
        value = typed(raw, kind)
        if kind == "float" and not math.isfinite(value):  # NaN or inf slips past every policy comparison
            raise ValueError(raw)
        return value
    except ValueError:
        what = _KINDS.get(kind, kind)
        raise FedcareError(
            f"the run request's {key} is not {what}", f"the coordinator must set {key} to {what} in the run config"
        ) from None


_KINDS = {"bool": "true or false", "int": "a whole number", "float": "a finite number", "str": "text"}
