"""MTLTrainer on a tiny BERT-style model built from a config (no download), 3 task heads:
the same steps as a plain loop with MTLBackward, with and without gradient accumulation."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import mtlfast  # noqa: E402
from mtlfast.integrations.hf import MTLTrainer  # noqa: E402

TASKS = ("topic", "sentiment", "length")


class TinyMultiTaskBert(nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=16, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        self.bert = transformers.BertModel(config)
        self.heads = nn.ModuleDict({"topic": nn.Linear(16, 4), "sentiment": nn.Linear(16, 2),
                                    "length": nn.Linear(16, 1)})

    def forward(self, input_ids, attention_mask, topic, sentiment, length):
        z = self.bert(input_ids, attention_mask=attention_mask).pooler_output
        losses = {"topic": nn.functional.cross_entropy(self.heads["topic"](z), topic),
                  "sentiment": nn.functional.cross_entropy(self.heads["sentiment"](z), sentiment),
                  "length": nn.functional.mse_loss(self.heads["length"](z).squeeze(-1), length)}
        return {"losses": losses, "features": z}


def _dataset(n=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    mask = (torch.rand(n, 8, generator=g) > 0.2).long()
    mask[:, 0] = 1
    return [{"input_ids": ids[i], "attention_mask": mask[i],
             "topic": ids[i, 0] % 4, "sentiment": ids[i, 1] % 2,
             "length": mask[i].sum().float() / 8} for i in range(n)]


class _Recording(MTLTrainer):
    """Keeps the batches the Trainer fed, in order, to replay them in the plain loop."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_equals_a_plain_loop(tmp_path, accumulation):
    torch.manual_seed(0)
    model = TinyMultiTaskBert()
    twin = copy.deepcopy(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, optim="adamw_torch",
        remove_unused_columns=False, report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = _Recording(model=model, args=args, train_dataset=_dataset(), method="upgrad",
                         shared="bert")
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == 6 and trainer.last_step_info.mode == "jacobian"

    engine = mtlfast.MTLBackward(twin.bert, "upgrad", accumulate=accumulation)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.0)
    for i, batch in enumerate(trainer.seen):
        out = twin(**batch)
        engine.backward(out["losses"], features=out["features"])
        if (i + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    moved = sum((p - q).abs().sum() for p, q in zip(
        model.parameters(), TinyMultiTaskBert().parameters(), strict=True))
    assert moved > 0


def test_a_forward_without_task_losses_is_refused(tmp_path):
    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            return {"loss": self.lin(x).sum()}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          remove_unused_columns=False, save_strategy="no")
    trainer = MTLTrainer(model=Single(), args=args, train_dataset=[{"x": torch.ones(2)}] * 4,
                         shared="lin")
    with pytest.raises(ValueError, match="'losses'"):
        trainer.train()
    with pytest.raises(ValueError, match="no attribute path"):
        MTLTrainer(model=Single(), args=args, shared="encoder")
