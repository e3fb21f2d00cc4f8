"""Multi-task architectures beyond hard parameter sharing, each a fused (batched) module with
its plain loop definition (``*Loop``, LibMTL's form) as the reference and checkpoint format.

Expert blocks (MMoE, CGC, PLE, DSelect-k) map an input ``x (..., K)`` to the per-task
representations ``(T, ..., D)`` (feed them to ``FusedHeads(...)(z, per_task=True)``). All
experts of a level run as one grouped GEMM per layer (``ExpertBank``), all gates as one GEMM
(``GateBank``), the per-task mixtures as one op (``mtlfast.ops.mixture``).

Column architectures (Cross-stitch, MTAN, LTB) run the T task columns of a stage-wise encoder
as one module (grouped convolutions over channel-stacked columns, ``StackedColumns``) and
return one representation per task.

Every block has ``shared_parameters()`` (what to pass as ``shared=`` to ``mtlfast.backward``)
and ``unfuse()`` (its loop definition with the same weights; ``state_dict`` keys are the loop's,
so checkpoints move both ways; key maps in each module's docstring).
"""

from ._columns import (
    BasicBlock,
    Bottleneck,
    StackedColumns,
    register_batchable,
    resnet,
    split_stages,
)
from .cgc import CGC
from .cross_stitch import CrossStitch, CrossStitchLoop
from .dselect_k import DSelectK
from .experts import ExpertBank
from .gates import GateBank
from .loops import CGCLoop, DSelectKLoop, MMoELoop, PLELoop
from .ltb import LTB, LTBLoop
from .mmoe import MMoE
from .mtan import MTAN, MTANLoop
from .ple import PLE

__all__ = ["CGC", "LTB", "MTAN", "PLE", "BasicBlock", "Bottleneck", "CGCLoop", "CrossStitch",
           "CrossStitchLoop", "DSelectK", "DSelectKLoop", "ExpertBank", "GateBank", "LTBLoop",
           "MMoE", "MMoELoop", "MTANLoop", "PLELoop", "StackedColumns", "register_batchable",
           "resnet", "split_stages"]
