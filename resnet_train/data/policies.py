"""Per-image augmentation policies (AutoAugment, RandAugment, TrivialAugment, cutout, random
erasing) for a whole uint8 NHWC batch at once, on the training device.

Torchvision's transforms, handed a batch, draw one op and magnitude for all of it; here every image
draws its own, as torchvision applied image by image would, but the batch is transformed at once:
each op slot computes every op family for the whole batch and `torch.where` / neutral factors keep
each image's own op (no per-image Python, no `.item()`, no host syncs, no float64, so it runs
unchanged on CPU, CUDA and Apple MPS).

Draws and application are separate. `draw_policy` consumes a fixed amount of randomness that
depends only on the batch size (never on image content or on which ops came up), so a resumed
run can skip a batch by drawing without applying. Params are per-image tensors: slice them
(`keep`) to apply a global batch's draws to one data-parallel shard.

Exactness: an image's result equals torchvision's `autoaugment._apply_op(image, op, magnitude,
InterpolationMode.NEAREST, fill=None)` bit for bit. The per-(op, magnitude) numbers (affine
matrices, blend factors, ...) are computed on the host in float64 exactly as torchvision does and
rounded to float32 once; on the device the same float32 operations run in the same order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy, RandAugment, TrivialAugmentWide

# torchvision's own helper, so that our matrices are its matrices to the last bit
from torchvision.transforms.functional import _get_inverse_affine_matrix

POLICIES = ("basic", "cutout", "trivialaugment", "randaugment", "autoaugment")
OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
ImageSize = int | tuple[int, int]

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


class _Rows:
    """Row-wise indexing for a dataclass of per-image tensors: `params[keep]` (a slice, for
    data-parallel shards) or `table[index_tensor]` (a gather, no sync)."""

    def __getitem__(self, rows: slice | Tensor):
        return type(self)(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


@dataclass(frozen=True)
class OpSlot(_Rows):
    """One op per image (row); applying a slot to an image that drew another op leaves it as is
    because every field below holds that family's neutral value for it."""

    op: Tensor  # (N,) int64 index into OP_NAMES; Identity for images whose op was not applied
    magnitude: Tensor  # (N,) float32, signed, as torchvision's `_apply_op` receives it
    theta: Tensor  # (N, 2, 3) float32 inverse affine matrix (output → input); identity unless geometric
    blend_ratio: Tensor  # (N,) float32 `ratio` of torchvision's `_blend`; 1 unless a blend op
    blend_complement: Tensor  # (N,) float32 `1.0 - ratio`, computed in float64 like torchvision; 0 = none
    posterize_mask: Tensor  # (N,) uint8 bit mask; 255 keeps all bits
    solarize_threshold: Tensor  # (N,) float32: invert pixels >= it; 0 = Invert, 256 = none


@dataclass(frozen=True)
class ErasingParams(_Rows):
    """One box per image, in pixels; height 0 erases nothing (not drawn, or no candidate fit)."""

    top: Tensor  # (N,) int64
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass(frozen=True)
class PolicyParams:
    """A batch's draws: op slots applied in order on uint8 (`apply_policy`), then optionally a box
    erased on the normalized batch (`apply_erasing(x, params.erasing)`)."""

    name: str
    slots: tuple[OpSlot, ...]
    erasing: ErasingParams | None = None

    def __getitem__(self, rows: slice | Tensor) -> PolicyParams:
        erasing = None if self.erasing is None else self.erasing[rows]
        return PolicyParams(self.name, tuple(slot[rows] for slot in self.slots), erasing)


# --------------------------------------------------------------------------------------------
# Host-side tables: every (op, magnitude) a policy can draw, computed once like torchvision does
# --------------------------------------------------------------------------------------------

_IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_BLEND_OPS = ("Brightness", "Color", "Contrast", "Sharpness")


def _theta(name: str, m: float, height: int, width: int) -> Sequence[float]:
    """torchvision's inverse affine matrix for a geometric op, with `F.affine`'s / `F.rotate`'s own
    arguments: shears about the top-left corner (center=[0, 0], i.e. [-w/2, -h/2] from the middle),
    translations by whole pixels (`int(magnitude)`), rotations about the middle (angle negated)."""
    corner = [1.0 * (0 - width * 0.5), 1.0 * (0 - height * 0.5)]
    shear = math.degrees(math.atan(m))
    if name == "ShearX":
        return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, [shear, 0.0])
    if name == "ShearY":
        return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, [0.0, shear])
    if name == "TranslateX":
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [1.0 * int(m), 0.0], 1.0, [0.0, 0.0])
    if name == "TranslateY":
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 1.0 * int(m)], 1.0, [0.0, 0.0])
    if name == "Rotate":
        return _get_inverse_affine_matrix([0.0, 0.0], -m, [0.0, 0.0], 1.0, [0.0, 0.0])
    return _IDENTITY_THETA


def _op_row(name: str, m: float, height: int, width: int) -> tuple:
    """The numbers one (op, signed magnitude) needs, in OpSlot's field order, in float64."""
    if name not in OP_INDEX:
        raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OP_NAMES)}")
    ratio = 1.0 + m  # adjust_brightness / _saturation / _contrast / _sharpness(img, 1.0 + magnitude)
    if name not in _BLEND_OPS or (name == "Sharpness" and min(height, width) <= 2):
        ratio = 1.0  # torchvision leaves images of side <= 2 unsharpened
    bits = int(m) if name == "Posterize" else 8
    threshold = {"Solarize": m, "Invert": 0.0}.get(name, 256.0)  # Invert == solarize at 0
    return (OP_INDEX[name], m, _theta(name, m, height, width), ratio, 1.0 - ratio,
            -int(2 ** (8 - bits)) & 0xFF, threshold)


def _op_table(rows: Sequence[tuple[str, float]], height: int, width: int, device: torch.device) -> OpSlot:
    """An OpSlot with one row per (op, magnitude): drawing is then an index into it."""
    columns = list(zip(*(_op_row(name, m, height, width) for name, m in rows)))
    dtypes = (torch.int64, torch.float32, torch.float32, torch.float32, torch.float32, torch.uint8, torch.float32)
    tensors = [torch.tensor(c, dtype=t, device=device) for c, t in zip(columns, dtypes)]
    tensors[2] = tensors[2].view(-1, 2, 3)
    return OpSlot(*tensors)


@functools.lru_cache(maxsize=32)
def _space_table(policy: str, num_bins: int, bins: tuple[int, ...], height: int, width: int,
                 device: torch.device) -> tuple[OpSlot, int]:
    """(table, number of ops) of torchvision's TrivialAugmentWide or RandAugment space, rows ordered
    (op, bin, sign): row (op * len(bins) + bin) * 2 + sign, where sign 1 negates signed ops
    (torchvision negates when its sign draw is 1). Cached: building it and copying it to the device
    every batch would cost host time and a transfer."""
    if policy == "trivialaugment":
        space = TrivialAugmentWide(num_bins)._augmentation_space(num_bins)
    else:
        space = RandAugment(num_magnitude_bins=num_bins)._augmentation_space(num_bins, (height, width))
    rows = []
    for name, (magnitudes, signed) in space.items():
        for b in bins:
            m = float(magnitudes[b].item()) if magnitudes.ndim > 0 else 0.0
            rows += [(name, m), (name, -m if signed else m)]
    return _op_table(rows, height, width, device), len(space)


def _hw(image_size: ImageSize) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


# --------------------------------------------------------------------------------------------
# Drawing: a fixed number of draws per batch, on the generator's device
# --------------------------------------------------------------------------------------------


def draw_policy(name: str, batch_size: int, image_size: ImageSize, generator: torch.Generator,
                **options) -> PolicyParams:
    """Per-image draws of policy `name` (one of POLICIES) for a batch of `image_size` (H, W) images.
    Options: trivialaugment `num_magnitude_bins`; randaugment `num_ops`, `magnitude`,
    `num_magnitude_bins`; autoaugment `policy` ("cifar10", "imagenet", "svhn"); cutout `size`, `p`."""
    drawers: dict[str, Callable[..., PolicyParams]] = {
        "basic": lambda n, hw, g: PolicyParams("basic", ()),
        "cutout": lambda n, hw, g, **o: PolicyParams("cutout", (), draw_cutout(n, hw, g, **o)),
        "trivialaugment": _draw_trivialaugment, "randaugment": _draw_randaugment, "autoaugment": _draw_autoaugment,
    }
    if name not in drawers:
        raise ValueError(f"unknown augmentation policy {name!r}; expected one of {', '.join(POLICIES)}")
    return drawers[name](batch_size, _hw(image_size), generator, **options)


def _draw_trivialaugment(n: int, hw: tuple[int, int], g: torch.Generator,
                         num_magnitude_bins: int = 31) -> PolicyParams:
    """TrivialAugmentWide: one op, uniform over 14, with a uniform bin and a random sign."""
    table, num_ops = _space_table("trivialaugment", num_magnitude_bins, tuple(range(num_magnitude_bins)), *hw, g.device)
    op, bin_, sign = (torch.randint(k, (n,), generator=g, device=g.device) for k in (num_ops, num_magnitude_bins, 2))
    return PolicyParams("trivialaugment", (table[(op * num_magnitude_bins + bin_) * 2 + sign],))


def _draw_randaugment(n: int, hw: tuple[int, int], g: torch.Generator, num_ops: int = 2, magnitude: int = 9,
                      num_magnitude_bins: int = 31) -> PolicyParams:
    """RandAugment: `num_ops` ops, each uniform over 14 (with repeats), at one fixed magnitude bin."""
    if not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"randaugment magnitude {magnitude} is not a bin in [0, {num_magnitude_bins})")
    table, space_size = _space_table("randaugment", num_magnitude_bins, (magnitude,), *hw, g.device)
    op = torch.randint(space_size, (num_ops, n), generator=g, device=g.device)
    sign = torch.randint(2, (num_ops, n), generator=g, device=g.device)
    return PolicyParams("randaugment", tuple(table[row] for row in op * 2 + sign))


@functools.lru_cache(maxsize=16)
def _autoaugment_tables(policy: str, height: int, width: int, device: torch.device) -> tuple[OpSlot, Tensor]:
    """Rows: 0 = Identity (op not applied), then 1 + (sub_policy * 2 + slot) * 2 + sign;
    and the (sub_policies, 2) application probabilities. Cached, like `_space_table`."""
    augment = AutoAugment(AutoAugmentPolicy(policy))
    space = augment._augmentation_space(10, (height, width))
    rows = [("Identity", 0.0)]
    for sub_policy in augment.policies:
        for name, _, bin_ in sub_policy:
            magnitudes, signed = space[name]
            m = float(magnitudes[bin_].item()) if bin_ is not None else 0.0
            rows += [(name, -m if signed else m), (name, m)]  # torchvision negates when its sign draw is 0
    probability = torch.tensor([[p for _, p, _ in sp] for sp in augment.policies], device=device)
    return _op_table(rows, height, width, device), probability


def _draw_autoaugment(n: int, hw: tuple[int, int], g: torch.Generator, policy: str = "cifar10") -> PolicyParams:
    """AutoAugment: a uniform sub-policy, then each of its two ops with its own probability."""
    table, probability = _autoaugment_tables(policy, *hw, g.device)
    sub_policy = torch.randint(len(probability), (n, 1), generator=g, device=g.device)
    u = torch.rand(n, 2, generator=g, device=g.device)
    sign = torch.randint(2, (n, 2), generator=g, device=g.device)
    slot = torch.arange(2, device=g.device)
    applied = u <= probability[sub_policy, slot]  # torchvision: probs[i] <= p
    rows = torch.where(applied, 1 + (sub_policy * 2 + slot) * 2 + sign, 0)
    return PolicyParams("autoaugment", (table[rows[:, 0]], table[rows[:, 1]]))


def params_from_ops(ops: Sequence[Sequence[tuple[str, float]]], image_size: ImageSize,
                    device: torch.device | str = "cpu") -> PolicyParams:
    """Params that apply `ops[i]` (a list of (op name, signed magnitude), the same length for every
    image) to image i: for tests, replays and pictures of what a policy does."""
    height, width = _hw(image_size)
    rows = tuple(sorted({op for image_ops in ops for op in image_ops}))
    table = _op_table(rows, height, width, torch.device(device))
    index = {row: i for i, row in enumerate(rows)}
    slots = zip(*([index[op] for op in image_ops] for image_ops in ops))
    return PolicyParams("explicit", tuple(table[torch.tensor(s, device=table.op.device)] for s in slots))


# --------------------------------------------------------------------------------------------
# Applying the op slots (uint8 in, uint8 out)
# --------------------------------------------------------------------------------------------


def apply_policy(images: Tensor, params: PolicyParams, keep: slice | None = None) -> Tensor:
    """Apply each image's drawn ops to a uint8 (N, H, W, 3) batch; returns a new uint8 NHWC batch
    (or `images` itself when there is nothing to apply). With `keep`, `params` were drawn for a
    global batch and `images` are its `keep` rows."""
    if keep is not None:
        params = params[keep]
    if not params.slots:
        return images
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (N, H, W, 3) batch, got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(params.slots[0].op):
        raise ValueError(f"{len(images)} images but params for {len(params.slots[0].op)}")
    x = images.permute(0, 3, 1, 2)  # NCHW view, as torchvision's ops expect
    for slot in params.slots:
        x = _apply_slot(x, slot)
    return x.permute(0, 2, 3, 1).contiguous()


def _apply_slot(x: Tensor, slot: OpSlot) -> Tensor:
    """One op per image. Each step below is the identity for images that drew another family, so
    running them all in sequence gives every image exactly its own op."""
    x = _affine(x, slot.theta)  # ShearX/Y, TranslateX/Y, Rotate
    x = _blend(x, _degenerate(x, slot.op), slot.blend_ratio, slot.blend_complement)
    x = x & slot.posterize_mask.view(-1, 1, 1, 1)
    x = torch.where(x >= slot.solarize_threshold.view(-1, 1, 1, 1), 255 - x, x)  # Solarize, Invert
    x = torch.where(_is(slot.op, "AutoContrast"), _autocontrast(x), x)
    return torch.where(_is(slot.op, "Equalize"), _equalize(x), x)


def _is(op: Tensor, name: str) -> Tensor:
    return (op == OP_INDEX[name]).view(-1, 1, 1, 1)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """torchvision's tensor `affine`/`rotate` (nearest, zero fill) with one matrix per image: the same
    float32 grid (`_gen_affine_grid`), `grid_sample`, round and cast. Exact identity for images whose
    matrix is the identity (nearest sampling lands on the pixel's own center)."""
    n, _, h, w = x.shape
    d = 0.5
    base_grid = torch.empty(1, h, w, 3, dtype=theta.dtype, device=theta.device)
    base_grid[..., 0].copy_(torch.linspace(-w * 0.5 + d, w * 0.5 + d - 1, steps=w, device=theta.device))
    base_grid[..., 1].copy_(torch.linspace(-h * 0.5 + d, h * 0.5 + d - 1, steps=h, device=theta.device).unsqueeze_(-1))
    base_grid[..., 2].fill_(1)
    rescaled_theta = theta.transpose(1, 2).clone()  # (divided column by column by Python numbers: a
    rescaled_theta[..., 0] /= 0.5 * w               # tensor of them would be a host copy and a sync per batch)
    rescaled_theta[..., 1] /= 0.5 * h
    grid = base_grid.view(1, h * w, 3).expand(n, h * w, 3).bmm(rescaled_theta).view(n, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.round(out).to(torch.uint8)


def _degenerate(x: Tensor, op: Tensor) -> Tensor:
    """The image each blend op mixes with (float32): Brightness black, Color grayscale, Contrast the
    grayscale mean, Sharpness a smoothed copy; zeros for every other op (its complement is 0)."""
    gray = grayscale(x)
    mean = torch.mean(gray.to(torch.float32), dim=(-3, -2, -1), keepdim=True)  # exact: integer sums < 2**24
    degenerate = torch.where(_is(op, "Color"), gray.float(), 0.0)
    degenerate = torch.where(_is(op, "Contrast"), mean, degenerate)
    return torch.where(_is(op, "Sharpness"), _smoothed(x).float(), degenerate)


def _blend(x: Tensor, degenerate: Tensor, ratio: Tensor, complement: Tensor) -> Tensor:
    """torchvision's `_blend`: (ratio * img1 + (1.0 - ratio) * img2).clamp(0, 255).to(uint8), the same
    float32 products and sum, truncated. ratio 1 and complement 0 give back x exactly."""
    ratio, complement = ratio.view(-1, 1, 1, 1), complement.view(-1, 1, 1, 1)
    return (ratio * x + complement * degenerate).clamp(0, 255).to(torch.uint8)


def grayscale(x: Tensor) -> Tensor:
    """torchvision's `rgb_to_grayscale`, the same float32 expression (N x 1 x H x W in x's dtype: uint8
    truncated as torchvision does, float kept)."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(x.dtype).unsqueeze(dim=-3)


def _smoothed(x: Tensor) -> Tensor:
    """torchvision's `_blurred_degenerate_image`: 3x3 smoothing (center weight 5) of the interior,
    rounded; the border keeps its pixels. Exact whatever the conv algorithm: every result is k/13,
    at least 1/26 away from a rounding tie."""
    if min(x.shape[-2:]) <= 2:
        return x  # no interior (and torchvision does not sharpen such images: ratio 1 in the table)
    kernel = torch.ones((3, 3), dtype=torch.float32, device=x.device)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    kernel = kernel.expand(x.shape[-3], 1, 3, 3)
    smoothed = torch.round(F.conv2d(x.float(), kernel, groups=x.shape[-3])).to(torch.uint8)
    out = x.clone()
    out[..., 1:-1, 1:-1] = smoothed
    return out


def _autocontrast(x: Tensor) -> Tensor:
    """torchvision's `autocontrast` per image and channel; a constant channel stays as is."""
    minimum = x.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    maximum = x.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    scale = 255 / (maximum - minimum)  # same expression as torchvision: reciprocal, then times 255
    constant = torch.isfinite(scale).logical_not()
    minimum = torch.where(constant, 0.0, minimum)
    scale = torch.where(constant, 1.0, scale)
    return ((x - minimum) * scale).clamp(0, 255).to(torch.uint8)


def _equalize(x: Tensor) -> Tensor:
    """torchvision's `equalize` (`_scale_channel`) for every image and channel at once, in integers:
    one scatter_add histogram per channel, the same step and lookup table, gathered back."""
    n, c, h, w = x.shape
    pixels = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(1, pixels, torch.ones_like(pixels, dtype=torch.int32))
    # torchvision: nonzero_hist[:-1].sum() — every pixel but those of the last non-empty bin (the max)
    top_count = hist.gather(1, pixels.amax(dim=1, keepdim=True))
    step = torch.div(h * w - top_count, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1, dtype=torch.int32) + torch.div(step, 2, rounding_mode="floor"),
                    step.clamp(min=1), rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    equalized = torch.where(step == 0, pixels, lut.gather(1, pixels))  # step 0: torchvision returns the channel
    return equalized.to(torch.uint8).view(n, c, h, w)


# --------------------------------------------------------------------------------------------
# Cutout and random erasing (boxes; applied after normalization)
# --------------------------------------------------------------------------------------------


def draw_cutout(batch_size: int, image_size: ImageSize, generator: torch.Generator, size: int = 16,
                p: float = 1.0) -> ErasingParams:
    """Cutout (DeVries & Taylor 2017): with probability p a size x size square whose center is
    uniform over the image, clipped at the borders (so it may be smaller, or partly outside)."""
    h, w = _hw(image_size)
    g, device = generator, generator.device
    applied = torch.rand(batch_size, generator=g, device=device) < p
    top = torch.randint(h, (batch_size,), generator=g, device=device) - size // 2  # center - size // 2
    left = torch.randint(w, (batch_size,), generator=g, device=device) - size // 2
    bottom, right = (top + size).clamp(max=h), (left + size).clamp(max=w)
    top, left = top.clamp(min=0), left.clamp(min=0)
    return ErasingParams(top, left, torch.where(applied, bottom - top, 0), torch.where(applied, right - left, 0))


def draw_erasing(batch_size: int, image_size: ImageSize, generator: torch.Generator, p: float = 0.5,
                 scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                 attempts: int = 10) -> ErasingParams:
    """torchvision's RandomErasing(p, scale, ratio) box. torchvision redraws area and aspect until
    the box fits (at most 10 tries, else no erasing); here every image draws all `attempts`
    candidates at once and takes the first that fits: the same distribution, fixed draws."""
    h, w = _hw(image_size)
    g, device = generator, generator.device
    applied = torch.rand(batch_size, generator=g, device=device) < p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(batch_size, attempts, generator=g, device=device))
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0])
                       * torch.rand(batch_size, attempts, generator=g, device=device))
    box_h = torch.round(torch.sqrt(area * aspect)).long()
    box_w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (box_h < h) & (box_w < w)
    first = torch.where(fits, torch.arange(attempts, device=device), attempts).amin(dim=1, keepdim=True)
    found = applied & (first[:, 0] < attempts)
    first = first.clamp(max=attempts - 1)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    u = torch.rand(batch_size, 2, generator=g, device=device)
    top = (u[:, 0] * (h - box_h + 1)).long().clamp(max=h - box_h)  # uniform in [0, h - box_h]
    left = (u[:, 1] * (w - box_w + 1)).long().clamp(max=w - box_w)
    box = (top, left, box_h, box_w)
    return ErasingParams(*(torch.where(found, v, 0) for v in box))  # not found: an empty box at (0, 0)


def erasing_mask(params: ErasingParams, image_size: ImageSize) -> Tensor:
    """(N, H, W) bool, True inside each image's box: use it for any layout or dtype."""
    h, w = _hw(image_size)
    rows = torch.arange(h, device=params.top.device)
    cols = torch.arange(w, device=params.top.device)
    in_rows = (rows >= params.top[:, None]) & (rows < (params.top + params.height)[:, None])
    in_cols = (cols >= params.left[:, None]) & (cols < (params.left + params.width)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def apply_erasing(images: Tensor, params: ErasingParams, keep: slice | None = None, value: float = 0.0) -> Tensor:
    """Fill each image's box of an (N, C, H, W) batch with `value`. Meant for the normalized float
    batch, where the default 0 is the mean color, as in both papers' code (cutout multiplies the
    normalized image by a 0/1 mask; RandomErasing goes after Normalize with value=0)."""
    if keep is not None:
        params = params[keep]
    mask = erasing_mask(params, images.shape[-2:])
    return images.masked_fill(mask[:, None], value)
