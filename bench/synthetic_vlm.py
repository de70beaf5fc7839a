"""Random-weight MiniCPM-V 4.6 folders as transformers 5.x saves them, for tests and benchmarks.

The weights and config come from transformers' own MiniCPMV4_6ForConditionalGeneration; the processor is
its own MiniCPMV4_6Processor over the PIL image processor, built without the video processor (which needs
torchvision, not installed here) and saved by its own save_pretrained: processor_config.json and
chat_template.jinja beside the tokenizer, whose tokenizer_config.json names the image special tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

IMAGE_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
    "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}
# Qwen-style turns with the image item where the user put it (MiniCPM-V 4.6's template places images alike).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image_pad|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def image_tokenizer(tokenizer_json: Path, bos: str = "<s>", eos: str = "</s>", unk: str = "<unk>"):
    """A fast tokenizer over tokenizer_json with MiniCPM-V's image special tokens added."""
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token=bos, eos_token=eos,
                                                unk_token=unk, pad_token=unk, extra_special_tokens=IMAGE_TOKENS)


def reference_processor(tokenizer, **image_settings) -> transformers.MiniCPMV4_6Processor:
    """transformers' processor over its PIL image processor, without the torchvision-only video processor."""
    image_processor = transformers.MiniCPMV4_6ImageProcessorPil(**image_settings)
    cls = transformers.MiniCPMV4_6Processor
    processor = cls.__new__(cls)
    processor.image_processor, processor.tokenizer, processor.chat_template = image_processor, tokenizer, CHAT_TEMPLATE
    processor.slice_mode = image_processor.slice_mode
    processor.default_use_image_id = image_processor.use_image_id
    processor.image_token_divisor = 4 if image_processor.downsample_mode == "4x" else 16
    for name in (*IMAGE_TOKENS, "image_token_id", "video_token_id"):
        setattr(processor, name, getattr(tokenizer, name))
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    return processor


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norms away from identity and weights scaled up, so every parameter shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
            elif parameter.dim() >= 2:
                parameter.mul_(3.0)
    return model.eval()


def write_minicpmv(folder: Path, tokenizer, text: dict[str, Any], vision: dict[str, Any], perturb: bool = True,
                   whole_characters_only: bool = False, seed: int = 0, **top: Any):
    """Save a MiniCPM-V 4.6 folder; returns (model, processor). tokenizer: an image_tokenizer; text: text_config
    (any AutoModel text type); vision: vision_config; top: MiniCPMV4_6Config fields (insert_layer_id, ...)."""
    folder = Path(folder)
    processor = reference_processor(tokenizer)
    config = transformers.MiniCPMV4_6Config(text_config=text, vision_config=vision,
                                            image_token_id=tokenizer.image_token_id, **top)
    torch.manual_seed(seed)
    model = transformers.MiniCPMV4_6ForConditionalGeneration(config).eval()
    if perturb:
        perturbed(model, seed)
    if whole_characters_only:
        # Head rows of the byte tokens that are not a whole UTF-8 character set to zero: random weights put some
        # row above zero at every step, so greedy text always decodes (a Python runner callback needs that).
        partial = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
        with torch.no_grad():
            model.lm_head.weight[partial] = 0.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor
