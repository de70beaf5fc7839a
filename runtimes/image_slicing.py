"""MiniCPM-V's image preprocessing, in the bundle's own code path: PIL and numpy only, no torch.

An image becomes an overview (the whole image resized to about scale_resolution^2 pixels) and,
when it is larger than that, a grid of slices cut from a second resize; each is normalised and
its sides are multiples of patch_size x the merges' fold, so the vision encoder maps it to
(H/p)*(W/p)/divisor LLM tokens. The prompt's image token becomes the placeholder run the LLM
expects: <image_id>i</image_id><image>{n x image token}</image> then rows of
<slice>{n x image token}</slice> separated by newlines.

Every step is the one MiniCPMV4_6ImageProcessorPil and MiniCPMV4_6Processor (transformers 5.x)
take, number for number (Python's round, int truncation, PIL bicubic on uint8, float64 rescale
then float32): pixel values and token ids equal theirs, which tests/test_minicpmv.py checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# The placeholder's token names, as a MiniCPM-V tokenizer_config.json names them.
TOKEN_NAMES = ("image_token", "image_start_token", "image_end_token", "slice_start_token", "slice_end_token",
               "image_id_start_token", "image_id_end_token")


@dataclass(frozen=True)
class SliceSettings:
    """processor_config.json's "image_processor" fields that decide pixels and placeholders."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    downsample_mode: str = "16x"
    use_image_id: bool = True
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC
    # Not transformers' fields: a bundle exported with BlueLM-V's relaxed aspect-ratio matching says so here.
    grid_rule: str = "minicpmv"  # or "relaxed" (relaxed_grid)
    relaxed_alpha: float = 0.1

    @classmethod
    def from_processor_config(cls, raw: dict) -> "SliceSettings":
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        for name in ("image_mean", "image_std"):
            if name in known:
                value = known[name]
                known[name] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        return cls(**known)

    @property
    def merge_factor(self) -> int:
        """Patches per side folded into one LLM token: 2 for "4x", 4 for "16x"."""
        return 2 if self.downsample_mode == "4x" else 4

    @property
    def tokens_divisor(self) -> int:
        return self.merge_factor**2


@dataclass
class SlicedImage:
    """One image's pixels for the vision encoder: [3, H, W] float32 each, slices row-major."""

    overview: np.ndarray
    slices: list[np.ndarray] = field(default_factory=list)
    grid: tuple[int, int] | None = None  # (rows, cols) of slices

    def arrays(self) -> list[np.ndarray]:
        """The overview, then the slices: the order their placeholders take in the prompt."""
        return [self.overview, *self.slices]

    def tokens(self, settings: SliceSettings) -> list[int]:
        """LLM tokens of the overview, then of each slice."""
        p = settings.patch_size
        return [(a.shape[1] // p) * (a.shape[2] // p) // settings.tokens_divisor for a in self.arrays()]


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def best_resize(size: tuple[float, float], settings: SliceSettings, allow_upscale: bool) -> tuple[int, int]:
    """(height, width) of about scale_resolution^2 pixels at the image's aspect ratio, sides on the patch fold."""
    height, width = size
    if height * width > settings.scale_resolution**2 or allow_upscale:
        aspect = width / height
        height = int(settings.scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    step = settings.patch_size * settings.merge_factor
    return _ensure_divide(height, step), _ensure_divide(width, step)


def best_grid(size: tuple[int, int], settings: SliceSettings) -> tuple[int, int] | None:
    """Rows x cols of slices: the candidate counts around area / scale_resolution^2, the grid whose
    aspect ratio is closest in log space (ties to more rows); None when one overview is enough."""
    height, width = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / settings.scale_resolution**2), settings.max_slice_nums)
    if multiple <= 1:
        return None
    if settings.grid_rule == "relaxed":
        return relaxed_grid(size, settings)
    grid, best_error = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > settings.max_slice_nums:
            continue
        for rows in range(1, count + 1):
            if count % rows:
                continue
            error = abs(log_ratio - math.log((count // rows) / rows))
            if error < best_error or (error == best_error and rows > grid[0]):
                grid, best_error = (rows, count // rows), error
    return grid


def relaxed_grid(size: tuple[int, int], settings: SliceSettings) -> tuple[int, int]:
    """BlueLM-V-3B's relaxed aspect-ratio matching (Lu et al. 2024, section 3.1) over MiniCPM-V's grids.

    Each grid of 2..max_slice_nums slices is a canvas of rows x cols tiles of scale_resolution^2; the image
    scaled to fit it keeps an effective resolution min(scaled area, original area) and wastes the rest of the
    canvas. LLaVA-NeXT's rule (relaxed_alpha 0) takes the largest effective resolution, then the least waste,
    which picks canvases far larger than the image when several reach its full resolution. Relaxed: of the
    grids whose effective resolution is within relaxed_alpha of the best, the one that wastes least (then
    fewer slices, then the closer aspect ratio). Only the grid changes: the slices are cut and resized as
    MiniCPM-V's processor cuts them. MiniCPM-V's own rule counts slices from the image's area first, which
    is already frugal: bench/vlm_slicing.py measures all three on the same images.
    """
    height, width = size
    area, side = height * width, settings.scale_resolution
    candidates = []
    for count in range(2, settings.max_slice_nums + 1):
        for rows in range(1, count + 1):
            if count % rows == 0:
                cols = count // rows
                scale = min(cols * side / width, rows * side / height)
                effective = min(area * scale * scale, area)
                candidates.append((effective, count * side * side - effective, count,
                                   abs(math.log(width / height) - math.log(cols / rows)), (rows, cols)))
    best = max(c[0] for c in candidates)
    eligible = [c for c in candidates if c[0] >= (1 - settings.relaxed_alpha) * best]
    return min(eligible, key=lambda c: (c[1], c[2], c[3]))[4]


def _refine_size(size: tuple[int, int], grid: tuple[int, int], settings: SliceSettings) -> tuple[int, int]:
    height, width = size
    rows, cols = grid
    slice_h, slice_w = best_resize((_ensure_divide(height, rows) / rows, _ensure_divide(width, cols) / cols),
                                   settings, allow_upscale=True)
    return slice_h * rows, slice_w * cols


def _rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, as transformers' convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, size: tuple[int, int], settings: SliceSettings) -> Image.Image:
    height, width = size
    return image.resize((width, height), resample=Image.Resampling(settings.resample))


def _normalised(image: Image.Image, settings: SliceSettings) -> np.ndarray:
    pixels = np.moveaxis(np.asarray(image), -1, 0)  # [C, H, W] uint8
    if settings.do_rescale:
        pixels = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    if settings.do_normalize:
        pixels = pixels.astype(np.float32, copy=False)
        mean = np.array(settings.image_mean, dtype=pixels.dtype)[:, None, None]
        std = np.array(settings.image_std, dtype=pixels.dtype)[:, None, None]
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels, dtype=np.float32)


def slice_image(image: Image.Image, settings: SliceSettings) -> SlicedImage:
    if settings.do_convert_rgb:
        image = _rgb(image)
    size = (image.height, image.width)
    grid = best_grid(size, settings) if settings.slice_mode else None
    overview = image
    if settings.do_resize:
        overview = _resize(image, best_resize(size, settings, allow_upscale=grid is None), settings)
    result = SlicedImage(_normalised(overview, settings), grid=grid)
    if grid is None:
        return result
    refine = _resize(image, _refine_size(size, grid, settings), settings) if settings.do_resize else image
    rows, cols = grid
    slice_h, slice_w = refine.height // rows, refine.width // cols
    for row in range(rows):
        for col in range(cols):
            box = (col * slice_w, row * slice_h, (col + 1) * slice_w, (row + 1) * slice_h)
            result.slices.append(_normalised(refine.crop(box), settings))
    return result


def placeholder(image: SlicedImage, settings: SliceSettings, tokens: dict[str, str], image_index: int | None) -> str:
    """The text an image token expands to; image_index is its place among the prompt's images
    (None: no <image_id> tag)."""
    counts = image.tokens(settings)
    text = tokens["image_start_token"] + tokens["image_token"] * counts[0] + tokens["image_end_token"]
    if image.grid is not None:
        rows, cols = image.grid
        slices = iter(counts[1:])
        text += "\n".join(
            "".join(tokens["slice_start_token"] + tokens["image_token"] * next(slices) + tokens["slice_end_token"]
                    for _ in range(cols))
            for _ in range(rows))
    if image_index is not None:
        text = f"{tokens['image_id_start_token']}{image_index}{tokens['image_id_end_token']}" + text
    return text


def expand_prompt(text: str, images: list[SlicedImage], settings: SliceSettings, tokens: dict[str, str]) -> str:
    """The prompt with its i-th image token replaced by image i's placeholder."""
    marker = tokens["image_token"]
    parts = text.split(marker)
    if len(parts) - 1 != len(images):
        raise ValueError(f"the prompt has {len(parts) - 1} image tokens ({marker}) for {len(images)} images")
    out = [parts[0]]
    for index, (image, rest) in enumerate(zip(images, parts[1:])):
        out.append(placeholder(image, settings, tokens, index if settings.use_image_id else None))
        out.append(rest)
    return "".join(out)
