"""Generation from a vision-language bundle: the image and the text in one user message through the
bundle's chat template, the assistant turn opened (as transformers' processor.apply_chat_template
does), the image sliced and its placeholders laid out by the bundle's own preprocessing, then the
text model's own decode. Only the bundle is read, never the source checkpoint.

`open_image_prompt` returns a plain Session (runtimes.multimodal.ImagePrompts) and the prompt's
token ids, so exporter/generate.py's `complete` streams the answer unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.generate import ChatTemplate, select_artifact
from cpm_mobile.exporter.tokenizer import TextTokenizer, read_json_object
from cpm_mobile.runtimes.image_slicing import SliceSettings
from cpm_mobile.runtimes.multimodal import ImagePrompts, MultimodalSession, open_multimodal_session


@dataclass
class VisionLanguageBundle:
    folder: Path
    target: str
    session: MultimodalSession
    runtime: str
    vision: dict[str, Any]  # the manifest's VisionContract
    tokenizer: TextTokenizer
    template: ChatTemplate
    eos_ids: list[int]
    passed_check: bool | None


def is_vision_language_bundle(folder: str | Path) -> bool:
    manifest, _ = select_artifact(folder)
    return manifest.get("vision") is not None


def open_vision_language(folder: str | Path, target: str | None = None,
                         session: MultimodalSession | None = None) -> VisionLanguageBundle:
    """The bundle's target artifact in its runtime (or `session` instead: the eager halves, for a benchmark)."""
    folder = Path(folder)
    manifest, artifact = select_artifact(folder, target)
    if manifest.get("vision") is None:
        raise InputError(folder, "bundle has no vision encoder (it was exported from a text-only checkpoint)")
    session = session or open_multimodal_session(folder, artifact)
    report = folder / "report.json"
    passed = read_json_object(report).get("passed") if report.is_file() else None
    return VisionLanguageBundle(folder, artifact["target"], session, getattr(session, "runtime_name", artifact["target"]),
                                manifest["vision"], TextTokenizer.from_folder(folder), ChatTemplate.from_folder(folder),
                                list(manifest["model"]["eos_ids"]), passed)


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise InputError(path, "no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(path, f"not an image PIL can read ({' '.join(str(exc).split())[:120]})") from None


def open_image_prompt(bundle: VisionLanguageBundle, image: Path | None, text: str) -> tuple[ImagePrompts, list[int]]:
    """A Session that prefills the prompt with its image, and the prompt's token ids."""
    from cpm_mobile.runtimes.image_slicing import expand_prompt, slice_image

    vision = bundle.vision
    settings = SliceSettings.from_processor_config(vision["processor"])
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    rendered = bundle.template.render([{"role": "user", "content": content}])
    slices = []
    if image is not None:
        sliced = slice_image(read_image(image), settings)
        rendered = expand_prompt(rendered, [sliced], settings, vision["tokens"])
        slices = [sliced.overview, *sliced.slices]
    ids = bundle.tokenizer.tokenizer.encode(rendered, add_special_tokens=False).ids
    if len(ids) >= bundle.session.max_seq_len:
        raise InputError(image or "--prompt", f"the prompt is {len(ids)} tokens with the image; the artifact holds "
                         f"{bundle.session.max_seq_len} positions")
    for pixels in slices:
        if max(pixels.shape[1:]) > vision["max_side"]:
            raise InputError(image, f"a {pixels.shape[1]}x{pixels.shape[2]} slice of this image is beyond the "
                             f"bundle's vision encoder ({vision['max_side']} px a side): its aspect ratio is too extreme")
    return ImagePrompts(bundle.session, vision["image_token_id"], {tuple(ids): slices}), ids
