"""Batched per-image augmentation policies: every op bit-exact against torchvision's own per-image
`_apply_op`, draws distributed as the policies say and reproducible from the generator alone,
shards (`keep`) consistent with the whole batch, cutout / random erasing boxes as specified."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomErasing
from torchvision.transforms.autoaugment import (
    AutoAugment,
    AutoAugmentPolicy,
    RandAugment,
    TrivialAugmentWide,
    _apply_op,
)

from resnet_train.data.policies import (
    OP_NAMES,
    POLICIES,
    ErasingParams,
    apply_erasing,
    apply_policy,
    draw_cutout,
    draw_erasing,
    draw_policy,
    erasing_mask,
    params_from_ops,
)

SIZES = [(32, 32), (24, 40)]  # square CIFAR, and non-square to catch a swapped height / width


def make_images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 NHWC images that exercise every op: each channel has its own value range (narrow ones
    for autocontrast / equalize, full ones for solarize), and every 7th image is constant (the
    degenerate cases of autocontrast and equalize)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 1, 1, 3), generator=g)
    span = torch.randint(0, 256, (n, 1, 1, 3), generator=g)
    images = (low + torch.rand(n, height, width, 3, generator=g) * span).clamp(0, 255).to(torch.uint8)
    images[::7] = images[::7, :1, :1]
    return images


def torchvision_result(image: torch.Tensor, ops: list[tuple[str, float]]) -> torch.Tensor:
    """torchvision applied to one uint8 HWC image, op after op, as its policies do."""
    chw = image.permute(2, 0, 1)
    for name, magnitude in ops:
        chw = _apply_op(chw, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return chw.permute(1, 2, 0)


def drawn_ops(params) -> list[list[tuple[str, float]]]:
    """Each image's (op name, magnitude) per slot, as Python values, for comparisons."""
    slots = [list(zip(s.op.tolist(), s.magnitude.tolist())) for s in params.slots]
    return [[(OP_NAMES[op], m) for op, m in image] for image in zip(*slots)]


def space_ops(space: dict, bins: range) -> list[tuple[str, float]]:
    """Every (op, signed magnitude) of a torchvision augmentation space over `bins`."""
    ops = []
    for name, (magnitudes, signed) in space.items():
        for b in bins if magnitudes.ndim > 0 else [0]:
            m = float(magnitudes[b]) if magnitudes.ndim > 0 else 0.0
            ops += [(name, m), (name, -m)] if signed else [(name, m)]
    return ops


def spaces(height: int, width: int) -> dict[str, list[tuple[str, float]]]:
    return {
        "trivialaugment": space_ops(TrivialAugmentWide()._augmentation_space(31), range(31)),
        "randaugment": space_ops(RandAugment()._augmentation_space(31, (height, width)), range(31)),
        "autoaugment": space_ops(AutoAugment()._augmentation_space(10, (height, width)), range(10)),
    }


def assert_matches_torchvision(images: torch.Tensor, ops: list[list[tuple[str, float]]], out: torch.Tensor):
    mismatches = [(i, ops[i]) for i in range(len(images))
                  if not torch.equal(out[i], torchvision_result(images[i], ops[i]))]
    assert not mismatches, f"{len(mismatches)} images differ from torchvision, e.g. {mismatches[:5]}"


# --------------------------------------------------------------------------------------------
# Bit-exact against torchvision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_every_op_and_magnitude_matches_torchvision(policy, size):
    """Every op of the policy's space at every bin, both signs (so the extreme bins and negative
    magnitudes), one per image of a single batch: each image equals torchvision's result."""
    ops = [[op] for op in spaces(*size)[policy]] + [[("Invert", 0.0)], [("Identity", 0.0)]]
    images = make_images(len(ops), *size)
    out = apply_policy(images, params_from_ops(ops, size))
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.is_contiguous()
    assert_matches_torchvision(images, ops, out)


def test_two_op_slots_compose_like_torchvision():
    """Random pairs of ops from the widest space, applied in order."""
    ops = spaces(32, 32)["trivialaugment"]
    pick = torch.randint(len(ops), (300, 2), generator=torch.Generator().manual_seed(1)).tolist()
    pairs = [[ops[a], ops[b]] for a, b in pick]
    images = make_images(len(pairs), seed=1)
    assert_matches_torchvision(images, pairs, apply_policy(images, params_from_ops(pairs, 32)))


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_drawn_batches_match_torchvision(policy):
    """Draw → apply end to end: each image equals torchvision given the ops it drew."""
    g = torch.Generator().manual_seed(0)
    params = draw_policy(policy, 256, (24, 40), g)
    images = make_images(256, 24, 40, seed=2)
    assert_matches_torchvision(images, drawn_ops(params), apply_policy(images, params))


def test_tiny_images_match_torchvision():
    """Images of side <= 2: torchvision skips sharpening; shears and rotations still resample."""
    ops = [[op] for op in spaces(2, 3)["randaugment"]]
    images = make_images(len(ops), 2, 3)
    assert_matches_torchvision(images, ops, apply_policy(images, params_from_ops(ops, (2, 3))))


def test_apply_has_no_data_dependent_host_syncs():
    """On the meta device (shapes only, no data) `.item()`, `.tolist()`, `nonzero`, boolean-mask
    indexing and `if tensor:` all raise, so running there proves the apply path has none of the
    host syncs that would stall a CUDA or MPS stream."""
    ops = [[op, ("Equalize", 0.0)] for op in spaces(32, 32)["trivialaugment"]]
    images = torch.empty(len(ops), 32, 32, 3, dtype=torch.uint8, device="meta")
    out = apply_policy(images, params_from_ops(ops, 32, device="meta"))
    assert out.shape == images.shape and out.dtype == torch.uint8
    box = draw_erasing(len(ops), 32, torch.Generator().manual_seed(0))
    box = ErasingParams(*(getattr(box, f.name).to("meta") for f in fields(box)))
    assert apply_erasing(torch.empty(len(ops), 3, 32, 32, device="meta"), box).shape == (len(ops), 3, 32, 32)


# --------------------------------------------------------------------------------------------
# Distribution of the draws
# --------------------------------------------------------------------------------------------


def assert_uniform(counts: torch.Tensor, n: int):
    """Every category within 5 binomial standard deviations of n / k."""
    k = len(counts)
    expected, sigma = n / k, math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert ((counts - expected).abs() < 5 * sigma).all(), counts


def test_trivialaugment_draws_one_uniform_op_with_uniform_bin_and_sign():
    n = 28_000
    params = draw_policy("trivialaugment", n, 32, torch.Generator().manual_seed(0))
    (slot,) = params.slots
    space = TrivialAugmentWide()._augmentation_space(31)
    names = list(space)
    assert {op for image in drawn_ops(params) for op in image} <= set(space_ops(space, range(31)))
    op = torch.tensor([names.index(OP_NAMES[i]) for i in slot.op.tolist()])
    assert_uniform(torch.bincount(op, minlength=len(names)), n)
    shear = slot.op == OP_NAMES.index("ShearX")
    bins = (slot.magnitude[shear].abs() / (0.99 / 30)).round().long()
    assert_uniform(torch.bincount(bins, minlength=31), int(shear.sum()))
    assert abs((slot.magnitude[shear] < 0).float().mean() - 0.5) < 0.05


def test_randaugment_draws_num_ops_uniform_ops_at_the_fixed_magnitude():
    n = 14_000
    params = draw_policy("randaugment", n, 32, torch.Generator().manual_seed(0), num_ops=3, magnitude=30)
    assert len(params.slots) == 3
    space = RandAugment()._augmentation_space(31, (32, 32))
    allowed = set(space_ops(space, range(30, 31)))
    assert all(op in allowed for image in drawn_ops(params) for op in image)
    for slot in params.slots:
        op = torch.tensor([list(space).index(OP_NAMES[i]) for i in slot.op.tolist()])
        assert_uniform(torch.bincount(op, minlength=len(space)), n)


def test_autoaugment_draws_cifar10_sub_policies_with_their_probabilities():
    """Every image's pair of ops is one CIFAR10 sub-policy (an op not applied shows as Identity),
    and each slot is applied with the mean of its sub-policies' probabilities."""
    n = 20_000
    params = draw_policy("autoaugment", n, 32, torch.Generator().manual_seed(0))
    augment = AutoAugment(AutoAugmentPolicy.CIFAR10)
    space = augment._augmentation_space(10, (32, 32))

    def candidates(name, bin_):
        m = float(space[name][0][bin_]) if bin_ is not None else 0.0
        return {(name, m), (name, -m), ("Identity", 0.0)} if space[name][1] else {(name, m), ("Identity", 0.0)}

    allowed = [(candidates(a[0], a[2]), candidates(b[0], b[2])) for a, b in augment.policies]
    for first, second in drawn_ops(params):
        assert any(first in a and second in b for a, b in allowed), (first, second)
    for j, slot in enumerate(params.slots):
        expected = sum(sp[j][1] for sp in augment.policies) / len(augment.policies)
        assert abs((slot.op != 0).float().mean().item() - expected) < 0.02


# --------------------------------------------------------------------------------------------
# Reproducibility: the generator alone decides, and a batch's draws have a fixed size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_skipping_a_batch_is_drawing_it_without_applying(policy):
    """Batch 2 is the same whether batch 1 was applied or only drawn, and applying never touches
    the generator."""
    images = make_images(16)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = draw_policy(policy, 16, 32, g1)
    state = g1.get_state()
    apply_policy(images, first)
    assert torch.equal(g1.get_state(), state)
    second = apply_policy(images, draw_policy(policy, 16, 32, g1))
    draw_policy(policy, 16, 32, g2)
    assert torch.equal(apply_policy(images, draw_policy(policy, 16, 32, g2)), second)


@pytest.mark.parametrize("policy, options", [("randaugment", {"magnitude": 0}), ("autoaugment", {"policy": "svhn"}),
                                             ("trivialaugment", {"num_magnitude_bins": 5}), ("cutout", {"size": 1})])
def test_randomness_consumed_depends_only_on_batch_size(policy, options):
    """Other options or other seeds draw different values, never a different number of them: the
    generator ends in the same state as with the defaults (per seed) and advances by the same
    amount (a CUDA-style offset is not visible on CPU, so compare states per seed)."""
    for seed in (0, 1):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        draw_policy(policy, 64, 32, g1)
        draw_policy(policy, 64, 32, g2, **options)
        assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_same_seed_same_batch_other_seed_other_batch(policy):
    images = make_images(64)

    def augmented(seed):
        return apply_policy(images, draw_policy(policy, 64, 32, torch.Generator().manual_seed(seed)))

    assert torch.equal(augmented(3), augmented(3))
    assert not torch.equal(augmented(3), augmented(4))


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_keep_applies_a_global_batch_draw_to_a_shard(policy):
    images = make_images(48, 24, 40)
    params = draw_policy(policy, 48, (24, 40), torch.Generator().manual_seed(0))
    full = apply_policy(images, params)
    for keep in (slice(0, 16), slice(16, 32), slice(32, 48)):
        assert torch.equal(apply_policy(images[keep], params, keep=keep), full[keep])


def test_basic_changes_nothing_and_unknown_names_fail():
    images = make_images(4)
    assert apply_policy(images, draw_policy("basic", 4, 32, torch.Generator())) is images
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        draw_policy("mixup", 4, 32, torch.Generator())
    with pytest.raises(ValueError, match="unknown op"):
        params_from_ops([[("Zoom", 1.0)]], 32)
    with pytest.raises(ValueError, match="uint8"):
        apply_policy(images.float(), draw_policy("randaugment", 4, 32, torch.Generator()))


# --------------------------------------------------------------------------------------------
# Cutout and random erasing
# --------------------------------------------------------------------------------------------


def test_cutout_erases_a_clipped_square_around_a_uniform_center():
    n, size = 4000, 16
    box = draw_cutout(n, 32, torch.Generator().manual_seed(0), size=size, p=1.0)
    bottom, right = box.top + box.height, box.left + box.width
    assert (box.top >= 0).all() and (bottom <= 32).all() and (box.left >= 0).all() and (right <= 32).all()
    inside = (box.top > 0) & (bottom < 32)  # not clipped vertically: the full side
    assert (box.height[inside] == size).all() and ((box.height >= size // 2) & (box.height <= size)).all()
    # the center (top + size // 2 before clipping) is uniform over the 32 rows
    center = torch.where(box.top > 0, box.top + size // 2, bottom - size + size // 2)
    assert_uniform(torch.bincount(center, minlength=32), n)


def test_cutout_probability_and_the_rest_untouched():
    n = 4000
    box = draw_cutout(n, 32, torch.Generator().manual_seed(0), size=8, p=0.3)
    assert abs((box.height > 0).float().mean() - 0.3) < 0.03
    x = torch.randn(n, 3, 32, 32) + 10  # never 0 by chance
    out = apply_erasing(x, box)
    mask = erasing_mask(box, 32)
    assert (out.permute(1, 0, 2, 3)[:, mask] == 0).all()
    assert torch.equal(out.permute(1, 0, 2, 3)[:, ~mask], x.permute(1, 0, 2, 3)[:, ~mask])
    assert torch.equal(mask.sum((1, 2)), box.height * box.width)


def test_erasing_boxes_fit_and_follow_torchvision_distribution():
    """Boxes lie inside and are smaller than the image, as torchvision requires, and their mean area
    and aspect match torchvision's own RandomErasing.get_params over many draws."""
    n, (h, w) = 4000, (32, 32)
    box = draw_erasing(n, (h, w), torch.Generator().manual_seed(0), p=1.0)
    assert ((box.height < h) & (box.width < w)).all()
    assert ((box.top + box.height <= h) & (box.left + box.width <= w)).all() and (box.top >= 0).all()
    torch.manual_seed(0)
    image = torch.zeros(3, h, w)
    reference = torch.tensor([RandomErasing.get_params(image, (0.02, 0.33), (0.3, 3.3), [0.0])[2:4]
                              for _ in range(n)]).float()
    ours = torch.stack([box.height, box.width], 1).float()
    assert abs((ours.prod(1).mean() / reference.prod(1).mean()) - 1) < 0.05
    assert abs((ours[:, 0] / ours[:, 1]).log().mean() - (reference[:, 0] / reference[:, 1]).log().mean()) < 0.05
    assert abs(ours[:, 0].mean() / reference[:, 0].mean() - 1) < 0.03


def test_erasing_probability_keep_and_no_fit():
    g = torch.Generator().manual_seed(0)
    box = draw_erasing(4000, 32, g, p=0.5)
    assert abs((box.height > 0).float().mean() - 0.5) < 0.03
    x = torch.randn(4000, 3, 32, 32)
    assert torch.equal(apply_erasing(x[100:200], box, keep=slice(100, 200)), apply_erasing(x, box)[100:200])
    # areas that can never fit: torchvision gives up after 10 tries and leaves the image alone
    never = draw_erasing(100, 32, g, p=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert (never.height == 0).all() and torch.equal(apply_erasing(x[:100], never), x[:100])


def test_cutout_policy_carries_its_boxes():
    params = draw_policy("cutout", 8, 32, torch.Generator().manual_seed(0), size=8)
    images = make_images(8)
    assert apply_policy(images, params) is images and params.erasing is not None
    assert torch.equal(params[2:4].erasing.top, params.erasing.top[2:4])
