"""Names both sides of the wire agree on: message types and record keys."""

FEATURE_STATS = "query.feature_stats"  # message type of the federated statistics round
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
HOSPITAL = "hospital"   # ConfigRecord in every reply: {"name": hospital name}
REFUSAL = "refusal"     # ConfigRecord in a reply that declines: {"reason": ..., "kind": "budget"|"data"}
NUM_EXAMPLES = "num-examples"
