"""Drop-in integrations with training frameworks: :class:`~mtlfast.integrations.hf.MTLTrainer`
for Hugging Face ``transformers.Trainer`` (``from mtlfast.integrations.hf import MTLTrainer``;
importing it needs ``transformers``). Lightning and Accelerate need no wrapper: call
``engine.backward`` where their loops call ``manual_backward`` / ``accelerator.backward``
(``examples/lightning_mtl.py``, ``examples/accelerate_mtl.py``)."""
