"""The re-identification terms against hand-computed values and independent formulas on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from handclip.errors import ConfigError
from handclip.losses import (
    BNNeck,
    IdentityLoss,
    IdentityTextLoss,
    LossInputs,
    Objective,
    SigLIPLoss,
    TripletLoss,
    batch_hard_triplet,
    hardest_pairs,
    identity_text_to_image,
    image_to_identity_text,
    siglip_loss,
    siglip_targets,
    smoothed_cross_entropy,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- SigLIP ---------------------------------------------------------------------------------


def test_siglip_labels_mark_every_same_identity_pair_positive():
    labels = siglip_targets(4, torch.tensor([7, 3, 7, 5]))
    assert labels.tolist() == [[1, -1, 1, -1], [-1, 1, -1, -1], [1, -1, 1, -1], [-1, -1, -1, 1]]
    assert siglip_targets(3, None).tolist() == [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]]


def test_siglip_loss_by_hand_with_two_positives_per_row():
    # unit features at right angles: cos = 1 on the diagonal, 0 elsewhere; images 0 and 1 share an identity
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # lengths do not matter: features are normalised
    t, b = math.log(10.0), -10.0
    loss = siglip_loss(image, text, torch.tensor(t), torch.tensor(b), torch.tensor([4, 4]))
    # every pair positive: diagonal logits 10 - 10 = 0, off-diagonal 0 - 10 = -10
    expected = -(2 * log_sigmoid(0.0) + 2 * log_sigmoid(-10.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # one identity each: the off-diagonal pairs are negatives, z = -1 turns -10 into +10
    alone = siglip_loss(image, text, torch.tensor(t), torch.tensor(b), torch.tensor([4, 5]))
    assert alone.item() == pytest.approx(-(2 * log_sigmoid(0.0) + 2 * log_sigmoid(10.0)) / 2, rel=1e-6)


def test_siglip_loss_equals_binary_cross_entropy_over_every_pair():
    torch.manual_seed(0)
    image, text = torch.randn(6, 5), torch.randn(6, 5)
    identities = torch.tensor([0, 0, 1, 2, 2, 2])
    scale, bias = torch.tensor(1.7), torch.tensor(-3.0)
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + bias
    positive = (identities[:, None] == identities[None, :]).float()
    reference = F.binary_cross_entropy_with_logits(logits, positive, reduction="sum") / 6
    assert siglip_loss(image, text, scale, bias, identities).item() == pytest.approx(reference.item(), rel=1e-5)


def test_siglip_term_starts_at_the_papers_scale_and_bias_and_learns_them():
    term = SigLIPLoss()
    assert term.log_scale.item() == pytest.approx(math.log(10.0)) and term.bias.item() == -10.0
    assert term.needs_text and {n for n, _ in term.named_parameters()} == {"log_scale", "bias"}
    inputs = LossInputs(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(0.0), torch.tensor([0, 1, 2, 3]))
    term(inputs).backward()
    assert term.bias.grad is not None and term.log_scale.grad is not None


# --- identity cross-entropy through a BN-neck ------------------------------------------------


def test_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    log_p = torch.log_softmax(logits, dim=1)[0]
    e = 0.1
    # target (1 - e) on the label + e / 3 on every class
    expected = -((1 - e + e / 3) * log_p[0] + (e / 3) * log_p[1] + (e / 3) * log_p[2])
    assert smoothed_cross_entropy(logits, torch.tensor([0]), e).item() == pytest.approx(expected.item(), rel=1e-6)
    assert smoothed_cross_entropy(logits, torch.tensor([0]), 0.0).item() == pytest.approx(-log_p[0].item())


def test_bn_neck_has_no_learned_shift_and_a_bias_free_classifier():
    neck = BNNeck(4, 3)
    assert neck.classifier.bias is None and not neck.norm.bias.requires_grad
    assert torch.all(neck.norm.bias == 0)
    # in evaluation, the neck is (x - running mean) / sqrt(running var + eps) * weight
    with torch.no_grad():
        neck.norm.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        neck.norm.running_var.fill_(4.0)
        neck.norm.weight.fill_(3.0)
    out = neck.train().normalised(torch.tensor([[3.0, 2.0, 1.0, 4.0]]))  # running statistics even in train mode
    assert out.tolist()[0] == pytest.approx([3.0, 0.0, -3.0, 0.0], abs=1e-4)


@pytest.mark.parametrize("feature", ["projected", "pre_projection", "both"])
def test_identity_loss_is_the_smoothed_cross_entropy_of_the_necks(feature):
    torch.manual_seed(0)
    term = IdentityLoss(num_identities=3, embed_dim=4, pre_projection_dim=6, feature=feature, label_smoothing=0.1)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    inputs = LossInputs(torch.randn(6, 4), None, torch.tensor(0.0), ids, image_pre_projection=torch.randn(6, 6))
    expected = []
    for name, neck in term.necks.items():
        x = inputs.feature(name)
        normed = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5) * neck.norm.weight  # batch statistics
        expected.append(smoothed_cross_entropy(normed @ neck.classifier.weight.T, inputs.identities, 0.1))
    assert term(inputs).item() == pytest.approx((sum(expected) / len(expected)).item(), rel=1e-5)
    assert term.needs_pre_projection == (feature != "projected")
    assert term.needs_identity_batches


def test_identity_loss_settings_are_named():
    with pytest.raises(ConfigError, match="IdentityLoss.feature='cls' must be one of projected, pre_projection, both"):
        IdentityLoss(3, 4, 6, feature="cls")
    with pytest.raises(ConfigError, match=r"IdentityLoss.label_smoothing=1 must be a number in \[0, 1\)"):
        IdentityLoss(3, 4, 6, label_smoothing=1)


# --- batch-hard triplet --------------------------------------------------------------------


def test_batch_hard_mining_picks_the_farthest_positive_and_the_nearest_negative():
    # points on a line; identity a at 0, 1, 5; identity b at 3, 9
    features = torch.tensor([[0.0], [1.0], [5.0], [3.0], [9.0]])
    identities = torch.tensor([0, 0, 0, 1, 1])
    positive, negative = hardest_pairs(features, identities)
    assert positive.tolist() == pytest.approx([5.0, 4.0, 5.0, 6.0, 6.0])
    assert negative.tolist() == pytest.approx([3.0, 2.0, 2.0, 2.0, 4.0])
    # margin 1: max(0, d+ - d- + 1) per anchor
    expected = sum(max(0.0, p - n + 1.0) for p, n in zip([5, 4, 5, 6, 6], [3, 2, 2, 2, 4], strict=True)) / 5
    assert batch_hard_triplet(features, identities, margin=1.0, normalize=False).item() == pytest.approx(expected)
    soft = sum(math.log1p(math.exp(p - n)) for p, n in zip([5, 4, 5, 6, 6], [3, 2, 2, 2, 4], strict=True)) / 5
    assert batch_hard_triplet(features, identities, margin=None, normalize=False).item() == pytest.approx(
        soft, rel=1e-6
    )


def test_triplet_on_normalised_features_measures_angles_only():
    features = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0], [0.0, 7.0]])
    identities = torch.tensor([0, 0, 1, 1])
    # normalised: same-identity points coincide (d+ = 0), the others are sqrt(2) apart
    assert batch_hard_triplet(features, identities, 0.3, normalize=True).item() == pytest.approx(0.0)
    raw = batch_hard_triplet(features, identities, 0.3, normalize=False).item()
    assert raw > 0  # raw: the 9-unit gap between the same identity's points is the hardest positive


def test_triplet_on_both_features_is_the_mean_of_the_two():
    projected, pre = torch.tensor([[0.0], [1.0], [3.0], [9.0]]), torch.tensor([[0.0], [4.0], [1.0], [2.0]])
    identities = torch.tensor([0, 0, 1, 1])
    inputs = LossInputs(image=projected, text=None, logit_scale=torch.tensor(0.0), identities=identities,
                        image_pre_projection=pre)  # fmt: skip
    each = [batch_hard_triplet(f, identities, 0.3, normalize=False).item() for f in (projected, pre)]
    term = TripletLoss(feature="both", normalize=False)
    assert term.needs_pre_projection and term(inputs).item() == pytest.approx(sum(each) / 2)
    assert each[0] != pytest.approx(each[1])


def test_anchors_without_a_positive_are_left_out():
    features = torch.tensor([[0.0], [1.0], [4.0]], requires_grad=True)
    loss = batch_hard_triplet(features, torch.tensor([0, 0, 1]), margin=0.0, normalize=False)
    # anchors 0 and 1: d+ = 1, d- = 4 and 3 -> 0; anchor 2 has no positive
    assert loss.item() == 0.0
    assert batch_hard_triplet(features, torch.tensor([0, 1, 2]), 0.3, False).item() == 0.0
    TripletLoss(feature="pre_projection")  # a valid choice
    with pytest.raises(ConfigError, match="TripletLoss.margin=-1 must be a number >= 0, or null"):
        TripletLoss(margin=-1)


# --- image-to-text against one text per identity -------------------------------------------


def test_image_to_identity_text_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # three identities' texts
    scale = torch.tensor(math.log(2.0))
    loss = image_to_identity_text(image, texts, scale, torch.tensor([0, 1]))
    # image 0: cosines (1, 0, -1) x 2; image 1: (0, 1, 0) x 2
    row0 = -(2 - math.log(math.exp(2) + 1 + math.exp(-2)))
    row1 = -(2 - math.log(1 + math.exp(2) + 1))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_identity_text_to_image_spreads_over_the_identitys_images():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 1])
    loss = identity_text_to_image(image, texts, torch.tensor(0.0), ids)
    # rows 0, 1 (text 0): cosines (1, 1, 0), target 1/2 on each of the first two; row 2 (text 1): (0, 0, 1)
    log_z0 = math.log(2 * math.e + 1)
    row0 = -(0.5 * (1 - log_z0) + 0.5 * (1 - log_z0))
    row2 = -(1 - math.log(2 + math.e))
    assert loss.item() == pytest.approx((2 * row0 + row2) / 3, rel=1e-6)


def test_identity_texts_are_one_learnable_embedding_per_identity():
    term = IdentityTextLoss(num_identities=5, embed_dim=4, direction="both")
    assert term.texts.shape == (5, 4) and term.texts.requires_grad
    inputs = LossInputs(torch.randn(4, 4), None, torch.tensor(1.0), torch.tensor([0, 0, 3, 3]))
    term(inputs).backward()
    assert term.texts.grad[[0, 3]].abs().sum() > 0


# --- the objective ---------------------------------------------------------------------------


def test_objective_reports_what_its_terms_need():
    objective = Objective(
        {
            "identity": lambda num_identities, embed_dim, pre_projection_dim: IdentityLoss(
                num_identities, embed_dim, pre_projection_dim, feature="both"
            ),
            "triplet": TripletLoss(),
        },
        num_identities=4, embed_dim=8, pre_projection_dim=16,
    )  # fmt: skip
    assert objective.needs_pre_projection and not objective.needs_text
    assert objective.terms_needing("needs_identity_batches") == ["identity", "triplet"]
    assert objective.neck() is objective.terms["identity"]
    heads = {n for n, _ in objective.named_parameters()}
    assert "terms.identity.necks.projected.classifier.weight" in heads
    assert "terms.identity.necks.pre_projection.norm.weight" in heads
