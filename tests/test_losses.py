import math

import pytest
import torch
import torch.nn.functional as F

from handclip.losses import LOGIT_SCALE_MAX, clamp_logit_scale, contrastive_loss, contrastive_targets


def test_loss_matches_a_hand_computed_value():
    # orthogonal unit features: logits = scale * I; each CE = log(1 + e^-s) ... with 2 samples
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised to e1, e2
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # e1 and (e1+e2)/sqrt2
    scale = torch.tensor(math.log(10.0))
    c = 1 / math.sqrt(2)
    logits = 10 * torch.tensor([[1.0, c], [0.0, c]])
    row0 = -math.log(math.exp(logits[0, 0]) / (math.exp(logits[0, 0]) + math.exp(logits[0, 1])))
    row1 = -math.log(math.exp(logits[1, 1]) / (math.exp(logits[1, 0]) + math.exp(logits[1, 1])))
    col0 = -math.log(math.exp(logits[0, 0]) / (math.exp(logits[0, 0]) + math.exp(logits[1, 0])))
    col1 = -math.log(math.exp(logits[1, 1]) / (math.exp(logits[0, 1]) + math.exp(logits[1, 1])))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-5)


def test_loss_equals_clip_reference_formula():
    torch.manual_seed(0)
    image, text, scale = torch.randn(6, 5), torch.randn(6, 5), torch.tensor(2.0)
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    target = torch.arange(6)
    reference = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx(reference.item(), rel=1e-6)


def test_multi_positive_targets_spread_over_same_identity():
    targets = contrastive_targets(4, torch.tensor([7, 7, 3, 7]))
    third = 1 / 3
    assert torch.allclose(
        targets,
        torch.tensor([[third, third, 0, third], [third, third, 0, third], [0, 0, 1.0, 0], [third, third, 0, third]]),
    )


def test_multi_positive_loss_hand_computed():
    # two images of one person, orthogonal features, scale e^s = 2: logits = [[2, 0], [0, 2]].
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(math.log(2.0))
    # single positive: CE = -log(e^2 / (e^2 + 1)) = log(1 + e^2) - 2 in every row and column
    single = contrastive_loss(image, text, scale)
    assert single.item() == pytest.approx(math.log(1 + math.e**2) - 2, rel=1e-6)
    # same identity: targets [1/2, 1/2], CE = log(1 + e^2) - 1: separating them is now penalised
    multi = contrastive_loss(image, text, scale, identities=torch.tensor([5, 5]))
    assert multi.item() == pytest.approx(math.log(1 + math.e**2) - 1, rel=1e-6)
    # different identities: the same as single positive
    distinct = contrastive_loss(image, text, scale, identities=torch.tensor([5, 6]))
    assert distinct.item() == pytest.approx(single.item(), rel=1e-6)


def test_clamp_keeps_logit_scale_in_range():
    parameter = torch.nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale(parameter)
    assert parameter.item() == pytest.approx(LOGIT_SCALE_MAX)
    parameter.data.fill_(-1.0)
    clamp_logit_scale(parameter)
    assert parameter.item() == 0.0


# --- the objective ---------------------------------------------------------------------------


def inputs(identities=None):
    from handclip.losses import LossInputs

    torch.manual_seed(0)
    return LossInputs(image=torch.randn(4, 3), text=torch.randn(4, 3), logit_scale=torch.tensor(1.5),
                      identities=identities)  # fmt: skip


def test_objective_sums_its_terms_by_weight():
    from handclip.losses import ContrastiveLoss, Objective

    batch = inputs(torch.tensor([0, 0, 1, 2]))
    objective = Objective({"a": ContrastiveLoss(weight=1.0), "b": ContrastiveLoss(weight=0.5, multi_positive=False)})
    total, parts = objective(batch)
    multi = contrastive_loss(batch.image, batch.text, batch.logit_scale, batch.identities)
    single = contrastive_loss(batch.image, batch.text, batch.logit_scale)
    assert parts["a"].item() == pytest.approx(multi.item()) and parts["b"].item() == pytest.approx(single.item())
    assert total.item() == pytest.approx(multi.item() + 0.5 * single.item())
    assert objective.needs_text


def test_a_term_built_later_gets_the_number_of_identities_and_its_parameters_are_the_objectives():
    import functools

    from handclip.losses import LossTerm, Objective

    class Classifier(LossTerm):
        def __init__(self, num_identities: int, embed_dim: int, weight: float = 1.0):
            super().__init__(weight)
            self.head = torch.nn.Linear(embed_dim, num_identities)

        def forward(self, batch):
            return F.cross_entropy(self.head(batch.image), batch.identities)

    objective = Objective({"id": functools.partial(Classifier, weight=2.0)}, num_identities=5, embed_dim=3)
    assert objective.terms["id"].head.out_features == 5
    assert {n for n, _ in objective.named_parameters()} == {"terms.id.head.weight", "terms.id.head.bias"}
    total, parts = objective(inputs(torch.tensor([0, 1, 2, 4])))
    assert total.item() == pytest.approx(2.0 * parts["id"].item())
    assert not objective.needs_text


def test_bad_objectives_are_named():
    from handclip.errors import ConfigError
    from handclip.losses import ContrastiveLoss, Objective

    with pytest.raises(ConfigError, match="loss.terms is empty"):
        Objective({})
    with pytest.raises(ConfigError, match="loss: ContrastiveLoss.weight=-1 must be a number"):
        ContrastiveLoss(weight=-1)
    with pytest.raises(ConfigError, match="loss.terms.x: dict is not a handclip.losses.LossTerm"):
        Objective({"x": dict})


class _PromptBackbone:
    """Stands in for a backbone: each prompt's text embedding is a fixed row, keyed by the prompt."""

    def __init__(self, embeddings: dict[str, list[float]]):
        self.names = list(embeddings)
        self.table = torch.tensor([embeddings[n] for n in self.names])
        self.calls = 0

    def tokenize(self, texts):
        ids = torch.tensor([[self.names.index(t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_text(self, input_ids, attention_mask):
        self.calls += 1
        return self.table[input_ids[:, 0]]


def test_class_prompt_loss_is_each_tasks_cross_entropy_over_its_prompts_and_skips_rows_without_a_class():
    from handclip.losses import ClassPromptLoss, LossInputs

    tasks = {"skin": ["fair skin", "dark skin"], "nails": ["bare nails", "painted nails", "red nails"]}
    text = {"fair skin": [1.0, 0, 0], "dark skin": [0, 1.0, 0], "bare nails": [0, 0, 1.0],
            "painted nails": [1.0, 1.0, 0], "red nails": [0, 1.0, 1.0]}  # fmt: skip
    backbone = _PromptBackbone(text)
    image = torch.tensor([[2.0, 0.1, 0.3], [0.2, 1.0, 0.5], [0.3, 0.3, 3.0]])
    labels = torch.tensor([[0, 1], [1, -1], [-1, 0]])  # image 1 has no nail class, image 2 no skin class
    scale = torch.tensor(math.log(10.0))
    term = ClassPromptLoss(weight=1.0, prompt_tasks=tasks)
    loss = term(LossInputs(image, None, scale, labels=labels, backbone=backbone))
    normal = F.normalize(image, dim=-1)
    prompts = F.normalize(backbone.table, dim=-1)
    skin = F.cross_entropy(10 * normal[:2] @ prompts[:2].T, labels[:2, 0])
    nails = F.cross_entropy(10 * normal[[0, 2]] @ prompts[2:].T, labels[[0, 2], 1])
    assert loss.item() == pytest.approx(((skin + nails) / 2).item(), rel=1e-5)
    # the right prompts scored higher: lower loss
    worse = term(LossInputs(image, None, scale, labels=torch.tensor([[1, 0], [0, -1], [-1, 1]]), backbone=backbone))
    assert worse.item() > loss.item()


def test_a_prompt_keeping_term_on_data_without_prompt_tasks_says_so_and_adds_nothing():
    from handclip.losses import ClassPromptLoss, LossInputs, PromptDistillation

    ClassPromptLoss(prompt_tasks=None)  # the configuration check, before the data is read: no word
    image = torch.randn(3, 4, requires_grad=True)
    for term in (ClassPromptLoss, PromptDistillation):
        with pytest.warns(UserWarning, match=f"{term.__name__} has nothing to keep: the data names no zero-shot"):
            made = term(**{"prompt_tasks" if term is ClassPromptLoss else "zero_shot_tasks": {}})
        assert made(LossInputs(image, None, torch.tensor(1.0))).item() == 0.0


def test_prompt_distillation_is_zero_where_the_model_still_sees_the_prompts_as_it_started_and_grows_as_it_drifts():
    from handclip.losses import LossInputs, PromptDistillation

    tasks = {"aspect": ["back", "palm"], "skin": ["fair skin", "dark skin", "medium skin"]}
    text = {"back": [1.0, 0, 0], "palm": [0, 1.0, 0], "fair skin": [0, 0, 1.0], "dark skin": [1.0, 1.0, 0],
            "medium skin": [0, 1.0, 1.0]}  # fmt: skip
    backbone = _PromptBackbone(text)
    backbone.logit_scale = torch.tensor(math.log(10.0))
    start = torch.tensor([[2.0, 0.1, 0.3], [0.2, 1.0, 0.5], [0.3, 0.3, 3.0], [1.0, 1.0, 1.0]])
    term = PromptDistillation(weight=1.0, zero_shot_tasks=tasks)
    term.teach(backbone, start)
    assert term.targets.shape == (4, 5) and torch.allclose(term.targets[:, :2].exp().sum(1), torch.ones(4))
    index = torch.tensor([2, 0])

    def loss(image):
        return term(LossInputs(image, None, backbone.logit_scale, index=index, backbone=backbone)).item()

    assert loss(start[index]) == pytest.approx(0.0, abs=1e-6)
    assert 0 < loss(start[index] + torch.tensor([0.3, 0.0, 0.0])) < loss(start[[1, 3]])
    # the targets travel with the checkpoint: a resumed run, taught again, loads them
    again = PromptDistillation(weight=1.0, zero_shot_tasks=tasks)
    again.teach(backbone, torch.zeros(4, 3) + 1)
    again.load_state_dict(term.state_dict())
    assert torch.equal(again.targets, term.targets)
