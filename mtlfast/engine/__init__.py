"""The per-task gradient engine behind ``mtlfast.backward`` (see api.py for the public API)."""

from .features import feature_gram
from .flat import SharedParams, add_to_grads
from .gramian import gramian, layerwise_update, weighted_update
from .inputs import as_features, as_losses, as_shared, scan_graph
from .jacobian import JacobianSink, jacobian
from .vjp import Batching, Strategy, per_task_grads, per_task_vjp

__all__ = [
    "Batching",
    "JacobianSink",
    "SharedParams",
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
    "weighted_update",
]
