"""Fine-tuning on class prompts with the pre-training loss (FLYP, Goyal et al., 2023), to keep zero-shot skills.

The data source names its zero-shot prompt tasks (`DataSource.prompts()`: for hands, skin, gender, nail polish,
...): each task's classes and a prompt per class. The training images carry their class of each task (`labels`,
-1 where a row has none). This term encodes every task's prompts with the text tower, as zero-shot evaluation
does, and trains each image towards its own class prompt against the task's other prompts: the image-to-text
half of CLIP's loss with the prompts as captions, at the model's own temperature. Re-identification captions
pull the embedding towards identities; this keeps the prompts of the named tasks readable from it. It keeps
the skills it names, and says nothing of others.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from handclip.losses.objective import LossInputs, LossTerm


class PromptEncoder:
    """The prompts of a term's tasks, tokenized once and encoded by the text tower as it is now (normalised)."""

    def __init__(self, prompts: Sequence[str]):
        self.prompts, self._tokens = list(prompts), None

    def __call__(self, backbone, device) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = dict(backbone.tokenize(self.prompts))
        text = backbone.encode_text(self._tokens["input_ids"].to(device), self._tokens["attention_mask"].to(device))
        return F.normalize(text.float(), dim=-1)


def nothing_to_keep(term: LossTerm) -> None:
    """Say that a term keeping the data's prompt skills has none to keep here (e.g. the demo's recipe on data that
    names no prompt tasks): it adds nothing to the loss, and the run goes on."""
    warnings.warn(f"loss: {type(term).__name__} has nothing to keep: the data names no zero-shot prompt task with two "
                  "classes or more (among the training images), so the term adds 0 to the loss; name tasks "
                  "(captions: data.source.zero_shot) or leave the term out", stacklevel=3)  # fmt: skip


class ClassPromptLoss(LossTerm):
    """Each image against its class prompt of every task the data names (`prompt_tasks`: {task: [prompt per
    class]}, in the order the batch's `labels` number the classes)."""

    needs_backbone = True  # runs the text tower on the prompts itself
    needs_labels = True

    def __init__(self, weight: float = 1.0, prompt_tasks: Mapping[str, Sequence[str]] | None = None):
        super().__init__(weight)
        # None in the configuration check, before the data is read
        self.tasks = {str(task): [str(p) for p in prompts] for task, prompts in (prompt_tasks or {}).items()}
        if prompt_tasks is not None and not self.tasks:
            nothing_to_keep(self)
        self._encode = PromptEncoder([prompt for task in self.tasks.values() for prompt in task])

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if not self.tasks:
            return inputs.image.sum() * 0.0
        if inputs.labels is None or inputs.backbone is None:
            raise ValueError("ClassPromptLoss needs the batch's class labels and the backbone")
        device = inputs.image.device
        text = self._encode(inputs.backbone, device)
        image = F.normalize(inputs.image.float(), dim=-1)
        scale = inputs.logit_scale.exp()
        losses, start = [], 0
        for column, task in enumerate(self.tasks.values()):
            logits = scale * image @ text[start : start + len(task)].T
            start += len(task)
            labels = inputs.labels[:, column].to(device)
            if (labels >= 0).any():
                losses.append(F.cross_entropy(logits, labels, ignore_index=-1))
        return torch.stack(losses).mean() if losses else image.sum() * 0.0
