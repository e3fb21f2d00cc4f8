"""``MTLTrainer``: a Hugging Face ``transformers.Trainer`` whose backward is mtlfast's.

``Trainer.training_step`` calls ``accelerator.backward(loss)`` on one scalar; a multi-task
step needs the T losses. The model's forward returns them instead of one loss: a mapping (or
a ``ModelOutput``) with ``"losses"`` (task name -> scalar loss) and, optionally,
``"features"`` (the shared representation the task heads read). Everything else of the
Trainer (optimizer, scheduler, clipping, logging, checkpoints, evaluation) is unchanged::

    class MultiTaskBert(nn.Module):
        def forward(self, input_ids, attention_mask, **labels):
            z = self.bert(input_ids, attention_mask=attention_mask).pooler_output
            return {"losses": {t: loss(head(z), labels[t]) for t, head in self.heads.items()},
                    "features": z}

    trainer = MTLTrainer(model=model, args=args, train_dataset=ds, method="upgrad",
                         shared="bert")
    trainer.train()

``gradient_accumulation_steps = k`` runs mtlfast's exact accumulation: the k micro-batches'
per-task gradients are summed and weighed once, at the step the Trainer syncs gradients
(``MTLBackward(accumulate=k)``; the weights of one batch of k x B). The logged loss is the sum
of the task losses. Mixed precision goes through the accelerator's GradScaler. One process:
multi-process Trainer runs (DDP) raise (use ``MTLBackward(process_group=...)`` in your own loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from ..api import MTLBackward
from ..methods import Method

__all__ = ["MTLTrainer"]

SharedSpec = str | Callable[[nn.Module], Iterable[torch.Tensor]] | nn.Module


def _shared_of(model: nn.Module, shared: SharedSpec) -> nn.Module | Iterable[torch.Tensor]:
    if isinstance(shared, nn.Module):
        return shared
    if callable(shared):
        return shared(model)
    target: Any = model
    for name in shared.split("."):
        if not hasattr(target, name):
            raise ValueError(f"shared={shared!r}: the model has no attribute path {shared!r} "
                             f"(no {name!r} on {type(target).__name__})")
        target = getattr(target, name)
    return target


def _unpack(out: object) -> tuple[Mapping[str, torch.Tensor], torch.Tensor | None]:
    losses = out.get("losses") if isinstance(out, Mapping) else getattr(out, "losses", None)
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("MTLTrainer: the model's forward must return a mapping (or ModelOutput) "
                         "with 'losses': {task name: scalar loss}, got "
                         f"{type(out).__name__} without it")
    features = out.get("features") if isinstance(out, Mapping) else getattr(out, "features",
                                                                             None)
    return losses, features


class MTLTrainer(transformers.Trainer):
    """``transformers.Trainer`` with ``mtlfast.backward`` in place of ``loss.backward()``.

    Args:
        method: a ``mtlfast.methods`` method or its name (default ``"upgrad"``).
        shared: the shared parameters: an attribute path of the model (``"bert"``,
            ``"encoder.layers"``), a module, or a callable ``model -> parameters``.
        engine_options: more ``MTLBackward`` options (``mode``, ``on_nonfinite``, ...);
            ``accumulate`` comes from ``gradient_accumulation_steps``.
        *args, **kwargs: the ``transformers.Trainer`` arguments.
    """

    def __init__(self, *args: Any, method: Method | str = "upgrad", shared: SharedSpec,
                 engine_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError("MTLTrainer runs in one process; for DDP use "
                             "mtlfast.MTLBackward(..., process_group=...) in your loop")
        options = dict(engine_options or {})
        if "accumulate" in options:
            raise ValueError("engine_options: accumulate comes from the TrainingArguments' "
                             "gradient_accumulation_steps")
        self.engine = MTLBackward(_shared_of(self.model, shared), method,
                                  accumulate=self.args.gradient_accumulation_steps, **options)
        #: The last step's ``StepInfo`` (weights, Gram, losses; see ``StepInfo.as_dict``).
        self.last_step_info = None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses, features = _unpack(model(**inputs))
        accumulating = self.args.gradient_accumulation_steps > 1
        self.last_step_info = self.engine.backward(
            losses, features=features, grad_scaler=getattr(self.accelerator, "scaler", None),
            step=self.accelerator.sync_gradients if accumulating else None)
        total = torch.stack([loss.detach() for loss in losses.values()]).sum()
        return total / self.args.gradient_accumulation_steps
