"""Learning without forgetting on the zero-shot prompts (LwF, Li and Hoiem, 2016; ZSCL, Zheng et al., 2023).

Before training, the model as it starts scores every training image (evaluation view) against the prompts of
every zero-shot task the data source names (`zero_shot_tasks`: hands: aspect, gender, skin, nail polish,
accessories): a distribution over each task's classes, per image, at the starting model's temperature. During
training this term keeps the model's own distribution for each image close to that one (KL divergence, averaged
over tasks), with the prompts encoded by the text tower as it is now. Unlike training on class labels (`loss=flyp`),
it needs no labels and keeps a task the training images show one class of (the demo's aspect: all dorsal right)
as the starting model saw it, instead of teaching that one class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from handclip.losses.class_prompts import PromptEncoder, nothing_to_keep
from handclip.losses.objective import LossInputs, LossTerm


class PromptDistillation(LossTerm):
    """KL from the starting model's prompt distributions of each training image (`teach`) to the model's own."""

    needs_backbone = True  # runs the text tower on the prompts itself
    needs_teacher = True  # the run calls `teach(backbone, features)` with the starting model before training
    run_records = ("targets",)  # of this run's training images: a resume keeps them, init_from makes its own

    def __init__(self, weight: float = 1.0, zero_shot_tasks: Mapping[str, Sequence[str]] | None = None):
        super().__init__(weight)
        self.tasks = {str(task): [str(p) for p in prompts] for task, prompts in (zero_shot_tasks or {}).items()}
        if zero_shot_tasks is not None and not self.tasks:
            nothing_to_keep(self)
        # the starting model's log-probabilities of each training image over every task's prompts, concatenated
        # [training images, prompts]; saved in checkpoints, so a resumed run keeps the same targets
        self.register_buffer("targets", torch.empty(0))
        self._prompt_embeddings = PromptEncoder([p for task in self.tasks.values() for p in task])

    def _log_probs(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * F.normalize(image.float(), dim=-1) @ text.T
        out, start = [], 0
        for task in self.tasks.values():
            out.append(F.log_softmax(logits[:, start : start + len(task)], dim=-1))
            start += len(task)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def teach(self, backbone, image_features: torch.Tensor) -> None:
        """Record the starting model's distributions: `image_features` are its projected embeddings of the training
        images (evaluation view), in the order of the batches' `index`."""
        if not self.tasks:
            return
        device = image_features.device
        text = self._prompt_embeddings(backbone, device)
        self.targets = self._log_probs(image_features, text, backbone.logit_scale.exp().float()).detach()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if not self.tasks:
            return inputs.image.sum() * 0.0
        if inputs.backbone is None or inputs.index is None:
            raise ValueError("PromptDistillation needs the backbone and the batch's image positions")
        if not self.targets.numel():
            raise RuntimeError("PromptDistillation was never taught: call teach() with the starting model first")
        device = inputs.image.device
        text = self._prompt_embeddings(inputs.backbone, device)
        own = self._log_probs(inputs.image, text, inputs.logit_scale.exp().float())
        target = self.targets.to(device)[inputs.index.to(device)]
        losses, start = [], 0
        for task in self.tasks.values():
            part = slice(start, start + len(task))
            start += len(task)
            losses.append(F.kl_div(own[:, part], target[:, part], log_target=True, reduction="batchmean"))
        return torch.stack(losses).mean()
