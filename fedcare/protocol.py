"""Names both sides of the wire agree on: message types and record keys."""

FEATURE_STATS = "query.feature_stats"  # message type of the federated statistics round
ARRAYS = "arrays"      # ArrayRecord: a plain train reply's update
MODEL = "model"        # ConfigRecord in train/evaluate messages: the global model, shared_models.weights.pack_arrays
CONFIG = "config"
METRICS = "metrics"
HOSPITAL = "hospital"   # ConfigRecord in every reply: {"name": hospital name}
REFUSAL = "refusal"     # ConfigRecord in a reply that declines: {"reason": ..., "kind": "budget"|"data"}
NUM_EXAMPLES = "num-examples"
EVALUATE_INCOMING = "evaluate-incoming"  # train config flag: test the received model before training on it
EVALUATION = "evaluation/"  # key prefix, in such a train reply's hospital record: the received model's test metrics
# Key prefix, in a train reply's hospital record: the hospital's own report on its training
# (train-seconds; with DP epsilon, noise-multiplier, steps). Not in the MetricRecord, which holds
# only what the strategy aggregates (num-examples, and train-loss without DP or secure aggregation).
TRAINED = "trained/"

# Secure aggregation (see secure_aggregation/ and server/secure_rounds.py)
SECAGG_ADVERTISE = "query.secagg_advertise"     # setup 1: node's public keys
SECAGG_SHARE_KEYS = "query.secagg_share_keys"   # setup 2: encrypted Shamir shares of its mask key
SECAGG_UNMASK = "query.secagg_unmask"           # per round: reveal shares for survivors / dropped
# A (flattened) protocol payload rides under this key prefix in the message's config record (server
# -> node) and in the reply's hospital record (node -> server): every record is one more request
# per node and message at the SuperLink, so none is added for it.
# The masked update too, as bytes (``secure_aggregation.records.pack_vector``) under "secagg/masked":
# a secure train reply is the hospital record alone.
SECAGG = "secagg/"
