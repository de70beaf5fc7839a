"""Generation from a vision-language bundle: the image and the text in one user message through the
bundle's chat template, the assistant turn opened (as transformers' processor.apply_chat_template
does), the image sliced and its placeholders laid out by the bundle's own preprocessing, then the
text model's own decode. Only the bundle is read, never the source checkpoint.

`open_image_prompt` returns a plain Session (runtimes.multimodal.ImagePrompts) and the prompt's
token ids, so exporter/generate.py's `complete` streams the answer unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator
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


class ImageChat:
    """A conversation about one image: the image goes with the first user message, each turn renders the whole
    conversation through the bundle's chat template and prefills only what the session does not hold yet. When the
    new rendering does not extend what it holds (a re-encoded answer differs), the whole conversation is prefilled
    again from position 0, which is exact for a recurrent (hybrid) state too; the image's slice features are kept,
    so the vision encoder runs once per conversation either way."""

    def __init__(self, bundle: VisionLanguageBundle, image: Path | None, system: str | None = None):
        from cpm_mobile.runtimes.image_slicing import slice_image

        self.bundle = bundle
        self.settings = SliceSettings.from_processor_config(bundle.vision["processor"])
        self.sliced = slice_image(read_image(image), self.settings) if image is not None else None
        self.slices = [self.sliced.overview, *self.sliced.slices] if self.sliced is not None else []
        self.session = ImagePrompts(bundle.session, bundle.vision["image_token_id"], {})
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []
        self.session.reset()

    def encode(self) -> list[int]:
        from cpm_mobile.runtimes.image_slicing import expand_prompt

        messages = [dict(m) for m in self.messages]
        first_user = next(m for m in messages if m["role"] == "user")
        if self.sliced is not None:
            first_user["content"] = [{"type": "image"}, {"type": "text", "text": first_user["content"]}]
        rendered = self.bundle.template.render(messages)
        if self.sliced is not None:
            rendered = expand_prompt(rendered, [self.sliced], self.settings, self.bundle.vision["tokens"])
        return self.bundle.tokenizer.tokenizer.encode(rendered, add_special_tokens=False).ids

    def reply(self, text: str, max_new_tokens: int, sample, timings=None) -> Iterator[str]:
        from cpm_mobile.exporter.generate import TextStream, decode_tokens

        self.messages.append({"role": "user", "content": text})
        ids = self.encode()
        if len(ids) >= self.session.max_seq_len:
            raise InputError("chat", f"the conversation is {len(ids)} tokens; the artifact holds "
                             f"{self.session.max_seq_len} positions")
        extends = 0 < len(self.cached) < len(ids) and ids[:len(self.cached)] == self.cached
        start = len(self.cached) if extends else 0
        if not extends:
            self.session.reset()
            self.session.prompts = {tuple(ids): self.slices}
        stream, stops, generated, answer = TextStream(self.bundle.tokenizer.tokenizer), set(self.bundle.eos_ids), [], []
        self.cached = []  # unknown until the prefill has run
        try:
            for token in decode_tokens(self.session, ids[start:], start, max_new_tokens, sample,
                                       self.bundle.eos_ids, timings):
                self.cached = ids + generated  # every token but the newest has been fed back
                generated.append(token)
                if token in stops:
                    continue
                piece = stream.push(token)
                if piece:
                    answer.append(piece)
                    yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
