"""Expert architectures for multi-task learning, fused: MMoE, CGC, PLE, DSelect-k.

Each block maps an input ``x (..., K)`` to the per-task representations ``(T, ..., D)`` (feed
them to ``FusedHeads(...)(z, per_task=True)``). All experts of a level run as one grouped GEMM
per layer (``ExpertBank``), all gates as one GEMM (``GateBank``), the per-task mixtures as one
op (``mtlfast.ops.mixture``). ``unfuse()`` returns the plain loop definition (``loops``), whose
checkpoints the fused blocks load and write (key maps in each module's docstring).
"""

from .cgc import CGC
from .dselect_k import DSelectK
from .experts import ExpertBank
from .gates import GateBank
from .loops import CGCLoop, DSelectKLoop, MMoELoop, PLELoop
from .mmoe import MMoE
from .ple import PLE

__all__ = ["CGC", "CGCLoop", "DSelectK", "DSelectKLoop", "ExpertBank", "GateBank", "MMoE",
           "MMoELoop", "PLE", "PLELoop"]
