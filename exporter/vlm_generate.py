"""Generation from a vision-language bundle: the image and the text in one user message through the
bundle's chat template, the assistant turn opened (as transformers' processor.apply_chat_template
does), the image sliced and its placeholders laid out by the bundle's own preprocessing, then the
text model's own decode. Only the bundle is read, never the source checkpoint.

`open_image_prompt` returns a plain Session (runtimes.multimodal.ImagePrompts) and the prompt's
token ids, so exporter/generate.py's `complete` streams the answer unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.generate import Chat, ChatTemplate, select_artifact
from cpm_mobile.exporter.tokenizer import TextTokenizer, read_json_object
from cpm_mobile.runtimes.image_slicing import SlicedImage, SliceSettings, expand_prompt, slice_image
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


def encode_conversation(render, tokenizer, messages: list[dict[str, Any]], sliced: SlicedImage | None,
                        settings: SliceSettings, tokens: dict[str, str]) -> list[int]:
    """Token ids of a conversation whose first user message carries the image (its content: that message's text),
    rendered through the chat template and the image token expanded into the slices' placeholders; special tokens
    come from the template only, as transformers' apply_chat_template(tokenize=True) encodes.
    render: the template's render; tokenizer: a tokenizers.Tokenizer."""
    if sliced is not None:
        messages = [dict(m) for m in messages]
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = [{"type": "image"}, {"type": "text", "text": first["content"]}]
    rendered = render(messages)
    if sliced is not None:
        rendered = expand_prompt(rendered, [sliced], settings, tokens)
    return tokenizer.encode(rendered, add_special_tokens=False).ids


def open_image_prompt(bundle: VisionLanguageBundle, image: Path | None, text: str) -> tuple[ImagePrompts, list[int]]:
    """A Session that prefills the prompt with its image, and the prompt's token ids."""
    vision = bundle.vision
    settings = SliceSettings.from_processor_config(vision["processor"])
    sliced = slice_image(read_image(image), settings) if image is not None else None
    ids = encode_conversation(bundle.template.render, bundle.tokenizer.tokenizer, [{"role": "user", "content": text}],
                              sliced, settings, vision["tokens"])
    if len(ids) >= bundle.session.max_seq_len:
        raise InputError(image or "--prompt", f"the prompt is {len(ids)} tokens with the image; the artifact holds "
                         f"{bundle.session.max_seq_len} positions")
    slices = sliced.arrays() if sliced is not None else []
    for pixels in slices:
        if max(pixels.shape[1:]) > vision["max_side"]:
            raise InputError(image, f"a {pixels.shape[1]}x{pixels.shape[2]} slice of this image is beyond the "
                             f"bundle's vision encoder ({vision['max_side']} px a side): its aspect ratio is too extreme")
    return ImagePrompts(bundle.session, vision["image_token_id"], {tuple(ids): slices}), ids


@dataclass
class ImageChat(Chat):
    """A conversation about one image (exporter/generate.py's Chat): the image goes with the first user message.
    A turn whose rendering extends what the session holds prefills only the new tokens; otherwise (a re-encoded
    answer tokenises differently) the whole conversation is prefilled again from position 0, exact for a
    recurrent (hybrid) state too. The slices' features are kept (ImagePrompts), so the vision encoder runs once
    per conversation either way: BlueLM-V's decoupled image encoding."""

    sliced: SlicedImage | None = None
    settings: SliceSettings | None = None
    image_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def about(cls, bundle: VisionLanguageBundle, image: Path | None, system: str | None = None) -> "ImageChat":
        settings = SliceSettings.from_processor_config(bundle.vision["processor"])
        sliced = slice_image(read_image(image), settings) if image is not None else None
        session = ImagePrompts(bundle.session, bundle.vision["image_token_id"], {})
        return cls(session, bundle.tokenizer.tokenizer, bundle.template, bundle.eos_ids, system=system,
                   sliced=sliced, settings=settings, image_tokens=bundle.vision["tokens"])

    @property
    def slices(self) -> list[np.ndarray]:
        return self.sliced.arrays() if self.sliced is not None else []

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        return encode_conversation(self.template.render, self.tokenizer, messages, self.sliced, self.settings,
                                   self.image_tokens)

    def _prefill_start(self, ids: list[int]) -> int:
        if 0 < len(self.cached) < len(ids) and ids[:len(self.cached)] == self.cached:
            return len(self.cached)
        self.session.reset()
        self.session.prompts = {tuple(ids): self.slices}
        return 0

    def _fit_context(self) -> list[int]:
        """The whole conversation, which must fit (dropping old turns would drop the image)."""
        ids = self.encode(self.messages)
        if len(ids) >= self.session.max_seq_len:
            raise InputError("chat", f"the conversation is {len(ids)} tokens; the artifact holds "
                             f"{self.session.max_seq_len} positions")
        return ids
