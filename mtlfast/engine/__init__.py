"""The per-task gradient engine behind ``mtlfast.backward``: the step as a pipeline (step.py),
its options and report (config.py), the non-finite policy (policy.py), the reducer protocol
(reduce.py), the producers (jacobian.py, gramian.py, features.py over vjp.py), the flat
buffers the update is written to (flat.py) and the input checks (inputs.py)."""

from .config import (
    DEFAULT_BUCKET_CAP_MB,
    DEFAULT_JACOBIAN_BUDGET,
    DistributedMode,
    EngineConfig,
    Mode,
    NonFinite,
    StepInfo,
)
from .features import feature_gram
from .flat import SharedParams, add_to_grads
from .gramian import gramian, layerwise_update
from .inputs import as_features, as_losses, as_shared, scan_graph
from .jacobian import JacobianSink, jacobian
from .reduce import Reducer
from .step import Engine
from .vjp import Batching, Strategy, per_task_grads, per_task_vjp

__all__ = [
    "DEFAULT_BUCKET_CAP_MB",
    "DEFAULT_JACOBIAN_BUDGET",
    "Batching",
    "DistributedMode",
    "Engine",
    "EngineConfig",
    "JacobianSink",
    "Mode",
    "NonFinite",
    "Reducer",
    "SharedParams",
    "StepInfo",
    "Strategy",
    "add_to_grads",
    "as_features",
    "as_losses",
    "as_shared",
    "feature_gram",
    "gramian",
    "jacobian",
    "layerwise_update",
    "per_task_grads",
    "per_task_vjp",
    "scan_graph",
]
