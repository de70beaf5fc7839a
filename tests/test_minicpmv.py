"""MiniCPM-V 4.6: the vision half and the image preprocessing against transformers' own classes.

The folder is what transformers 5.x saves: MiniCPMV4_6ForConditionalGeneration's weights and
config, the tokenizer with the image special tokens in tokenizer_config.json, processor_config.json
and chat_template.jinja (no preprocessor_config.json). The processor is transformers' own class;
it is built without its video processor, which needs torchvision (not installed), and everything
it does for images is its own code.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from bench.synthetic_vlm import IMAGE_TOKENS, image_tokenizer, reference_processor, write_minicpmv
from conftest import train_test_tokenizer
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import load_model
from cpm_mobile.exporter.models.vision import VisionConfig, load_vision_encoder
from cpm_mobile.runtimes.image_slicing import TOKEN_NAMES, SliceSettings, expand_prompt, slice_image

# Patch 14 as the real checkpoints; a 5x5 position table, so buckets are uneven at every slice size.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=70,
              patch_size=14)
LLAMA_TEXT = dict(model_type="llama", vocab_size=336, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2)
# Sizes and aspect ratios that take each slicing branch: one overview (small, upscaled; long and thin),
# 1x2, 2x2, 2x3 grids, and a ratio no grid matches well.
IMAGE_SIZES = [(448, 448), (30, 40), (100, 1500), (600, 900), (1000, 1000), (896, 1344), (333, 777)]


def image_tokenizer_in(folder: Path):
    """The test BPE tokenizer (conftest) with MiniCPM-V's image special tokens."""
    train_test_tokenizer(folder)
    return image_tokenizer(folder / "tokenizer.json")


def minicpmv_folder(folder: Path, text: dict, whole_characters_only: bool = False,
                    **top) -> tuple[Path, torch.nn.Module, transformers.ProcessorMixin]:
    """A MiniCPM-V 4.6 folder as transformers saves it, random weights; its model and processor."""
    model, processor = write_minicpmv(folder, image_tokenizer_in(folder), text, VISION,
                                      whole_characters_only=whole_characters_only, insert_layer_id=1, **top)
    return folder, model, processor


@pytest.fixture(scope="module")
def llama_v(tmp_path_factory):
    return minicpmv_folder(tmp_path_factory.mktemp("minicpmv46-llama"), LLAMA_TEXT)


def test_the_folder_is_the_layout_transformers_writes(llama_v):
    folder, _, _ = llama_v
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
            "chat_template.jinja"} <= names
    assert "preprocessor_config.json" not in names
    assert json.loads((folder / "tokenizer_config.json").read_text())["image_token"] == "<|image_pad|>"


def _packed(slices: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> transformers' NaViT packing [1, 3, patch, B*H*W/patch]."""
    _, channels, height, width = slices.shape
    return torch.cat([s.reshape(channels, height // patch, patch, width // patch, patch).permute(0, 2, 1, 3, 4)
                      .reshape(channels, patch, -1) for s in slices], dim=-1)[None]


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_vision_encoder_equals_transformers_on_every_slice_shape(llama_v, mode):
    folder, model, _ = llama_v
    ours = load_vision_encoder(folder, mode)
    generator = torch.Generator().manual_seed(1)
    for height, width in [(56, 56), (112, 168), (224, 112), (392, 280)]:
        slices = torch.randn(2, 3, height, width, generator=generator)
        sizes = torch.tensor([[height // 14, width // 14]] * 2, dtype=torch.int32)
        with torch.no_grad():
            theirs = torch.cat(model.model.get_image_features(_packed(slices, 14), sizes, downsample_mode=mode)
                               .pooler_output)
            mine = ours(slices)
        divisor = 16 if mode == "16x" else 4
        assert mine.shape == (2, height * width // (14 * 14 * divisor), LLAMA_TEXT["hidden_size"])
        assert theirs.abs().max() > 1.0
        assert (mine.reshape(theirs.shape) - theirs).abs().max() / theirs.abs().max() < 1e-5, (height, width)


def test_text_model_of_a_minicpmv_folder_with_a_llama_llm(llama_v):
    folder, model, _ = llama_v
    ours, checkpoint = load_model(folder, max_seq_len=64)
    assert checkpoint.config.model_type == "llama" and checkpoint.config.weight_prefix == "model.language_model."
    prompt = torch.tensor([[1, 17, 42, 300, 5, 99, 123, 60]])
    with torch.no_grad():
        theirs = model(input_ids=prompt).logits[0]
        logits = ours(prompt, torch.tensor([0]))[0]
    assert (logits - theirs).abs().max() / theirs.abs().max() < 1e-5


def _images() -> list[Image.Image]:
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    rgba = generator.integers(0, 256, (120, 90, 4), dtype=np.uint8)
    return [*images, Image.fromarray(rgba, "RGBA"), images[3].convert("L")]


@pytest.mark.parametrize("image_settings", [{}, {"downsample_mode": "4x", "max_slice_nums": 4},
                                            {"use_image_id": False, "scale_resolution": 224}],
                         ids=["default", "4x-four-slices", "no-image-id-224"])
def test_pixels_and_token_ids_equal_the_processors(llama_v, image_settings):
    _, _, saved = llama_v
    processor = reference_processor(saved.tokenizer, **image_settings)
    settings = SliceSettings.from_processor_config(processor.image_processor.to_dict())
    tokens = {name: IMAGE_TOKENS[name] for name in TOKEN_NAMES}
    text = "<|im_start|>user\n<|image_pad|>What is this? And this: <|image_pad|><|im_end|>\n"
    images = _images()
    for first, second in zip(images, images[1:] + images[:1]):
        theirs = processor(text=[text], images=[first, second], return_tensors="np")
        sliced = [slice_image(first, settings), slice_image(second, settings)]
        pixels = np.concatenate([_packed(torch.from_numpy(a[None]), 14)[0].numpy() for image in sliced
                                 for a in [image.overview, *image.slices]], axis=-1)[None]
        assert np.array_equal(pixels, theirs["pixel_values"]), first.size
        ids = saved.tokenizer(expand_prompt(text, sliced, settings, tokens))["input_ids"]
        assert ids == theirs["input_ids"][0].tolist(), first.size
    assert any(slice_image(image, settings).grid for image in images)  # slicing ran, not only overviews


def test_vision_config_refuses_what_it_cannot_build(llama_v, tmp_path):
    folder, _, _ = llama_v
    raw = json.loads((folder / "config.json").read_text())
    config = VisionConfig.from_hf_dict(raw)
    assert (config.insert_layer_id, config.downsample_mode, config.llm_hidden_size) == (1, "16x", 64)
    assert config.side_multiple() == 56 and config.side_multiple("4x") == 28
    for change, message in [({"downsample_mode": "8x"}, "downsample_mode"), ({"insert_layer_id": 7}, "insert_layer_id"),
                            ({"merge_kernel_size": [2, 3]}, "merge_kernel_size")]:
        with pytest.raises(InputError, match=message):
            VisionConfig.from_hf_dict({**raw, **change}, tmp_path / "config.json")


PROMPT = "<|im_start|>user\n<|image_pad|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"


# The released 4.6's LLM is the hybrid Qwen3.5 text model (linear-attention layers with a recurrent state); a dense
# Llama LLM takes the same vision path.
QWEN35_TEXT = dict(model_type="qwen3_5_text", vocab_size=336, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
                   linear_conv_kernel_dim=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                   layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])


@pytest.fixture(scope="module")
def varied_v(tmp_path_factory):
    """The released layout (hybrid LLM), weights 0.1 wide so greedy text varies token to token, for the export and
    generation tests (the dense-LLM folder above covers the vision half and the text model with a Llama LLM)."""
    return minicpmv_folder(tmp_path_factory.mktemp("minicpmv46-qwen3_5"), QWEN35_TEXT, whole_characters_only=True,
                           initializer_range=0.1)


@pytest.fixture(scope="module")
def vl_bundle(varied_v, tmp_path_factory):
    """`cpm-mobile export` of the folder: every format's halves, checked, with the image path's contract."""
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    folder, _, _ = varied_v
    out = tmp_path_factory.mktemp("vl-bundles")
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--target", "all", "--out", str(out),
                                      "--name", "v46"])
    assert result.exit_code == 0, result.output
    return out / "v46"


@pytest.fixture(scope="module")
def multimodal_pte(vl_bundle):
    manifest = json.loads((vl_bundle / "manifest.json").read_text())
    [pte] = [a for a in manifest["artifacts"] if a["target"] == "executorch"]
    return vl_bundle / "model.pte", pte["metadata"]


def _our_inputs(processor, image: Image.Image) -> tuple[list[int], list[np.ndarray]]:
    settings = SliceSettings.from_processor_config(processor.image_processor.to_dict())
    sliced = slice_image(image, settings)
    text = expand_prompt(PROMPT, [sliced], settings, {name: IMAGE_TOKENS[name] for name in TOKEN_NAMES})
    return processor.tokenizer(text)["input_ids"], [sliced.overview, *sliced.slices]


@pytest.mark.slow
def test_pte_greedy_after_an_image_equals_transformers_generate(varied_v, multimodal_pte):
    from cpm_mobile.runtimes.check import CheckPlan, greedy_runs
    from cpm_mobile.runtimes.multimodal import ImagePrompts, prompt_embeddings
    from cpm_mobile.runtimes.multimodal import ExecuTorchMultimodalSession

    _, model, processor = varied_v
    path, info = multimodal_pte
    assert info["methods"] == ["vision_encoder", "token_embedding", "text_decoder"]
    session = ExecuTorchMultimodalSession(path)
    images = _images()
    for image in [images[0], images[5]]:  # one overview; a 2x3 slice grid
        theirs = processor(text=[PROMPT], images=[image], return_tensors="pt")
        with torch.no_grad():
            expected = model.generate(**theirs, max_new_tokens=10, do_sample=False)[0, theirs["input_ids"].shape[1]:]
            logits = model(**theirs).logits[0].numpy()
        ids, slices = _our_inputs(processor, image)
        assert ids == theirs["input_ids"][0].tolist()
        image_prompts = ImagePrompts(session, processor.tokenizer.image_token_id, {tuple(ids): slices})
        assert greedy_runs(image_prompts, CheckPlan([ids], 10)).runs[0].generated == expected.tolist()
        session.reset()
        ours = session.forward_embeddings(prompt_embeddings(session, ids, processor.tokenizer.image_token_id, slices), 0)
        # The fp32 recipe's bound (fp32 summation order); with XNNPACK's own tanh-GELU kernel it was 1.5e-4-1.9e-4,
        # and a wrong slice order or a missing merge moves it by O(1).
        assert np.abs(ours - logits).max() / np.abs(logits).max() < 2e-5, image.size
    assert len(set(expected.tolist())) > 1  # the continuation is not one token repeated


@pytest.mark.slow
def test_a_slice_beyond_the_exported_bound_is_refused_by_name(multimodal_pte):
    from cpm_mobile.runtimes.multimodal import ExecuTorchMultimodalSession

    session = ExecuTorchMultimodalSession(multimodal_pte[0])
    assert (session.side_multiple, session.max_side) == (56, 896)
    with pytest.raises(ValueError, match="exported for sides up to 896 px"):
        session.encode_image(np.zeros((3, 112, 952), dtype=np.float32))
    with pytest.raises(ValueError, match="multiples of 56"):
        session.encode_image(np.zeros((3, 112, 100), dtype=np.float32))


@pytest.mark.slow
def test_executorchs_multimodal_runner_runs_the_pte_to_the_same_text(varied_v, multimodal_pte):
    """The stock client: ExecuTorch's MultimodalRunner, fed the prompt as token runs and one image input per slice
    (its own order: each input through its encoder, then text_decoder at the running position)."""
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_token_input

    from cpm_mobile.runtimes.multimodal import image_token_runs
    from cpm_mobile.runtimes.executorch import load_kernel_libraries

    folder, model, processor = varied_v
    image = _images()[3]
    theirs = processor(text=[PROMPT], images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**theirs, max_new_tokens=10, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    ids, slices = _our_inputs(processor, image)
    inputs, cursor = [], 0
    for (start, end), pixels in zip(image_token_runs(ids, processor.tokenizer.image_token_id), slices):
        inputs += [make_token_input(ids[cursor:start]), make_image_input(torch.from_numpy(pixels)[None])]
        cursor = end
    inputs.append(make_token_input(ids[cursor:]))
    load_kernel_libraries()
    pieces: list[str] = []
    runner = MultimodalRunner(str(multimodal_pte[0]), str(folder / "tokenizer.json"))
    runner.generate(inputs, GenerationConfig(max_new_tokens=10, temperature=0.0, echo=False), token_callback=pieces.append)
    text = processor.tokenizer.decode(expected)
    assert "\ufffd" not in text and len(text.strip()) > 3
    assert "".join(pieces) == text


@pytest.mark.slow
def test_the_bundle_passes_its_check_and_states_its_image_path(vl_bundle):
    report = json.loads((vl_bundle / "report.json").read_text())
    manifest = json.loads((vl_bundle / "manifest.json").read_text())
    assert manifest["source"]["family"] == "qwen3_5"
    assert report["passed"] and set(report["artifacts"]) == {"executorch", "onnx", "coreml"}
    for target, entry in report["artifacts"].items():
        assert entry["passed"], (target, entry["breaches"])
        metrics = entry["faithfulness"]["metrics"]
        # Three check images (overview only, 1x2, 2x3): 1 + 3 + 7 slices, each through both vision encoders.
        assert metrics["vision_slices"] == 11 and metrics["vision_max_rel"] < 2e-5 and metrics["greedy"] == 1.0
        assert len(metrics["greedy_tokens"]) == 3
        # fp32 summation order; Core ML against its twin with the same fp16 states (3e-4, the fp32 recipe's bound)
        assert metrics["max_rel_logits"] < (3e-4 if target == "coreml" else 2e-5), target
    coreml = report["artifacts"]["coreml"]
    assert coreml["faithfulness"]["against"] == "eager model with fp16 KV cache"
    # against fp32 the Core ML program pays its fp16 states (the recipe's Core ML fidelity bound: 5e-3)
    assert coreml["fidelity"]["metrics"]["max_rel_logits"] > 3 * coreml["faithfulness"]["metrics"]["max_rel_logits"]
    [onnx] = [a for a in manifest["artifacts"] if a["target"] == "onnx"]
    assert {"model.onnx", "embedding.onnx", "vision.onnx"} <= set(onnx["files"])
    assert onnx["io"]["inputs"][0]["name"] == "inputs_embeds"
    vision = manifest["vision"]
    assert vision["tokens"]["image_token"] == "<|image_pad|>" and vision["tokens_divisor"] == 16
    assert (vision["side_multiple"], vision["max_side"], vision["hidden_size"]) == (56, 896, 64)
    assert vision["processor"]["scale_resolution"] == 448
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json"} <= set(manifest["files"])


@pytest.mark.slow
@pytest.mark.parametrize("size", [(448, 448), (896, 1344)])
def test_generate_with_an_image_prints_transformers_greedy_answer(varied_v, vl_bundle, tmp_path, size):
    """`cpm-mobile generate BUNDLE --image --prompt` against transformers: the processor's chat template with the
    image and the text in one user message, the assistant turn opened, greedy generate, the answer decoded."""
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    _, model, processor = varied_v
    image = Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8))
    path = tmp_path / "image.png"
    image.save(path)
    question = "What is in the picture?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = processor(text=[rendered], images=[image], return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**theirs, max_new_tokens=12, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    expected = processor.tokenizer.decode(answer, skip_special_tokens=True)
    assert len(expected.strip()) > 3
    for artifact in json.loads((vl_bundle / "manifest.json").read_text())["artifacts"]:
        result = CliRunner().invoke(app, ["generate", str(vl_bundle), "--target", artifact["target"], "--image",
                                          str(path), "--prompt", question, "-n", "12"])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected.strip(), artifact["target"]


def test_generate_refuses_a_bad_image_and_what_it_cannot_do_yet(vl_bundle, tmp_path):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    result = CliRunner().invoke(app, ["generate", str(vl_bundle), "--image", str(not_an_image), "--prompt", "Hi"])
    assert result.exit_code == 2 and "notes.png: not an image PIL can read" in result.output
    result = CliRunner().invoke(app, ["generate", str(vl_bundle), "--image", str(tmp_path / "missing.png"), "-p", "Hi"])
    assert result.exit_code == 2 and "missing.png: no such image file" in result.output
    result = CliRunner().invoke(app, ["generate", str(vl_bundle), "-p", "Hi", "--speculative", "ngram"])
    assert result.exit_code == 2 and "does not take --speculative yet" in result.output


@pytest.mark.slow
def test_check_repeats_the_exports_verdict_and_numbers(vl_bundle):
    from cpm_mobile.exporter.bundle_check import check_bundle

    exported = json.loads((vl_bundle / "report.json").read_text())["artifacts"]
    again = check_bundle(vl_bundle).report["artifacts"]
    for target in exported:
        assert again[target]["passed"]
        for gate in ("faithfulness", "fidelity"):
            for metric in ("max_rel_logits", "sqnr_db", "vision_max_rel", "vision_sqnr_db", "greedy"):
                assert again[target][gate]["metrics"][metric] == pytest.approx(
                    exported[target][gate]["metrics"][metric], rel=1e-6), (target, metric)


def test_inspect_shows_the_vision_half(llama_v):
    from cpm_mobile.exporter.inspect import summarize

    folder, _, _ = llama_v
    summary = summarize(folder)
    assert summary.family == "llama" and summary.layers == 2
    assert "3 layers x 32, patch 14" in summary.vision and "merger after layer 1" in summary.vision
    assert "about 64 tokens per 448x448 slice" in summary.vision
    assert ("vision", summary.vision) in summary.rows()


def test_the_dry_run_says_its_rows_leave_out_the_vision_half(llama_v):
    from cpm_mobile.exporter.defaults import DEFAULT_MODEL
    from cpm_mobile.exporter.estimate import vision_language_caption
    from cpm_mobile.exporter.models.vision import load_vision_encoder

    folder, _, _ = llama_v
    count = sum(p.numel() for p in load_vision_encoder(folder).parameters())
    caption = vision_language_caption(folder)
    assert caption.startswith("vision-language checkpoint: the rows are its LLM on text")
    assert f"({count / 1e6:.1f} M parameters" in caption
    assert vision_language_caption(DEFAULT_MODEL) is None


@pytest.mark.slow
def test_chat_about_an_image_answers_each_turn_as_transformers(varied_v, vl_bundle, tmp_path):
    """Two turns of `generate --chat --image`: the image goes with the first message, the second turn prefills only
    what the session lacks (or the whole conversation again, exactly, when the re-rendered answer tokenises
    differently) and the slices are encoded once; each answer equals transformers' greedy answer to the same
    conversation (the processor's chat template over every turn so far, the image in the first)."""
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    _, model, processor = varied_v
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (600, 900, 3), dtype=np.uint8))
    path = tmp_path / "image.png"
    image.save(path)
    questions = ["What is in the picture?", "And what colour is it?"]
    messages, expected = [], []
    for question in questions:
        content = [{"type": "image"}, {"type": "text", "text": question}] if not messages else question
        messages.append({"role": "user", "content": content})
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        theirs = processor(text=[rendered], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**theirs, max_new_tokens=10, do_sample=False)[0, theirs["input_ids"].shape[1]:]
        answer = processor.tokenizer.decode(out, skip_special_tokens=True)
        expected.append(answer.strip())
        messages.append({"role": "assistant", "content": answer})
    for target in ("executorch", "onnx"):
        result = CliRunner().invoke(app, ["generate", str(vl_bundle), "--target", target, "--image", str(path),
                                          "--chat", "-n", "10"], input="\n".join(questions) + "\n\n")
        assert result.exit_code == 0, result.output
        assert [line.strip() for line in result.stdout.splitlines() if line.strip()] == expected, target


def test_a_chat_encodes_the_image_once(vl_bundle, tmp_path):
    from cpm_mobile.exporter.generate import greedy
    from cpm_mobile.exporter.vlm_generate import ImageChat, open_vision_language

    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (600, 900, 3), dtype=np.uint8)).save(path)
    chat = ImageChat.about(open_vision_language(vl_bundle, "onnx"), path)
    for question in ("What is it?", "Why?", "Where?"):
        "".join(chat.reply(question, 6, greedy))
    assert chat.session.encoded == len(chat.slices) == 3  # overview + a 1x2 grid, encoded in the first turn only


@pytest.fixture(scope="module")
def vl_int4_bundle(varied_v, tmp_path_factory):
    """`cpm-mobile export -r vlm-int4` of the hybrid folder, its fidelity bound widened: int4 on this 64-wide
    random LLM costs KL 0.12 against the shipped 0.1 (sized for real checkpoints); every other bound as shipped."""
    import yaml
    from typer.testing import CliRunner

    from cpm_mobile.cli import app
    from cpm_mobile.recipes import load_recipe

    folder, _, _ = varied_v
    out = tmp_path_factory.mktemp("vl-int4")
    recipe = load_recipe("vlm-int4").model_dump(mode="json", exclude_unset=True)
    for spec in recipe["targets"].values():
        spec["fidelity"]["max_kl"] = 0.5
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--recipe", str(out / "recipe.yaml"),
                                      "--out", str(out), "--name", "q"])
    assert result.exit_code == 0, result.output
    return out / "q"


@pytest.mark.slow
def test_vlm_int4_stores_both_halves_quantised_with_exact_twins(varied_v, vl_bundle, vl_int4_bundle, tmp_path):
    """BlueLM-V's mixed precision: int4 LLM (GPTQ grid) + 8-bit vision encoder grid, in the .pte and the .onnx."""
    from typer.testing import CliRunner

    from cpm_mobile.cli import app
    from cpm_mobile.exporter.bundle_check import check_bundle

    report = json.loads((vl_int4_bundle / "report.json").read_text())
    assert report["passed"] and set(report["artifacts"]) == {"executorch", "onnx"}
    for target, entry in report["artifacts"].items():
        faithful, fidelity = entry["faithfulness"]["metrics"], entry["fidelity"]["metrics"]
        # the vision grid's twin is exact (fp32 activations): fp32 rounding only; against the fp32 tower it costs
        assert faithful["vision_sqnr_db"] > 100 and faithful["vision_max_rel"] < 1e-5, target
        assert 25 < fidelity["vision_sqnr_db"] < 70, target
        assert faithful["greedy"] == 1.0 and fidelity["kl"] > 10 * faithful["kl"], target
    assert report["vision_quantization"]["linears"] == 26 and report["vision_quantization"]["fp32_linears"] == []
    sizes = {}
    for folder in (vl_bundle, vl_int4_bundle):
        manifest = json.loads((folder / "manifest.json").read_text())
        sizes[folder] = {name: (folder / name).stat().st_size for a in manifest["artifacts"] for name in a["files"]
                         if not name.endswith(".mlpackage")}
    fp32, int4 = sizes[vl_bundle], sizes[vl_int4_bundle]
    for name in ("model.pte", "model.onnx", "embedding.onnx"):
        assert int4[name] < 0.6 * fp32[name], (name, int4[name], fp32[name])
    # vision.onnx: each gridded linear's 4 bytes a weight become 1 + 4 / 32 (codes and fp32-held fp16 scales); the
    # tiny tower's position table, patch convolution and norms stay fp32
    import onnx
    from onnx import numpy_helper

    def weight_bytes(path: Path) -> int:  # initializers only: the file also holds each node's name scopes
        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(path).graph.initializer)

    linears = [m.weight.numel() for m in load_vision_encoder(varied_v[0]).modules() if isinstance(m, torch.nn.Linear)]
    saved = weight_bytes(vl_bundle / "vision.onnx") - weight_bytes(vl_int4_bundle / "vision.onnx")
    assert saved == pytest.approx((4 - 1 - 4 / 32) * sum(linears), rel=1e-3), (saved, sum(linears))
    again = check_bundle(vl_int4_bundle).report["artifacts"]
    for target, entry in report["artifacts"].items():
        assert again[target]["passed"]
        for metric in ("kl", "vision_sqnr_db", "greedy"):
            assert again[target]["faithfulness"]["metrics"][metric] == pytest.approx(
                entry["faithfulness"]["metrics"][metric], rel=1e-6), (target, metric)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(image)
    for target in ("executorch", "onnx"):
        result = CliRunner().invoke(app, ["generate", str(vl_int4_bundle), "--target", target, "--image", str(image),
                                          "--prompt", "What is in the picture?", "-n", "6"])
        assert result.exit_code == 0 and result.stdout.strip(), result.output


@pytest.mark.slow
def test_a_wrong_vision_code_fails_the_vision_gate(vl_int4_bundle, tmp_path):
    """One flipped code in one vision linear's MatMulNBits: the exact vision twin catches it."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from cpm_mobile.exporter.bundle_check import check_bundle

    bundle = tmp_path / "q"
    shutil.copytree(vl_int4_bundle, bundle)
    graph = onnx.load(bundle / "vision.onnx")
    node = next(n for n in graph.graph.node if n.op_type == "MatMulNBits")
    codes = next(t for t in graph.graph.initializer if t.name == node.input[1])
    array = numpy_helper.to_array(codes).copy()
    array.reshape(-1)[0] ^= 0x80  # the first code's sign bit
    codes.CopyFrom(numpy_helper.from_array(array, codes.name))
    onnx.save(graph, bundle / "vision.onnx")
    report = check_bundle(bundle).report
    onnx_entry = report["artifacts"]["onnx"]
    assert not onnx_entry["passed"]
    assert any(line.startswith("faithfulness: vision encoder:") for line in onnx_entry["breaches"])
    assert report["artifacts"]["executorch"]["passed"]  # the other format's grid is untouched


def test_a_context_shorter_than_an_image_prompt_is_refused(varied_v, tmp_path):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    result = CliRunner().invoke(app, ["export", "--model", str(varied_v[0]), "--max-seq-len", "512", "--out",
                                      str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--max-seq-len: 512 is shorter than an image prompt of this checkpoint's slicing needs (1152)" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_quantising_recipe_for_core_ml_is_refused_by_name(varied_v, tmp_path):
    """Core ML's multimodal packages are float so far: a recipe that quantises for it is refused before work."""
    import yaml
    from typer.testing import CliRunner

    from cpm_mobile.cli import app
    from cpm_mobile.recipes import load_recipe

    recipe = load_recipe("vlm-int4").model_dump(mode="json", exclude_unset=True)
    recipe["targets"]["coreml"] = load_recipe("fp32").model_dump(mode="json", exclude_unset=True)["targets"]["coreml"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--model", str(varied_v[0]), "--recipe", str(tmp_path / "recipe.yaml"),
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "vision-language export does not quantise for coreml yet" in result.output and not out.exists()


def test_a_vision_recipe_is_refused_for_a_text_model(tmp_path):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app
    from cpm_mobile.exporter.defaults import DEFAULT_MODEL

    result = CliRunner().invoke(app, ["export", "--model", str(DEFAULT_MODEL), "--recipe", "vlm-int4",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is for vision-language checkpoints" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_relaxed_grid_and_4x_tokens_are_recipe_options_the_bundle_declares(varied_v, tmp_path):
    """BlueLM-V's relaxed aspect-ratio matching and the merger's 4x mode, set by a recipe: the bundle's processor
    settings say so, the check slices its images that way (600x900: a 2x2 grid where MiniCPM-V's rule takes 1x2)
    and passes, and the context is sized for 4x's longer image runs."""
    import yaml
    from typer.testing import CliRunner

    from cpm_mobile.cli import app
    from cpm_mobile.exporter.vlm_bundle import check_image
    from cpm_mobile.recipes import load_recipe

    folder, _, _ = varied_v
    recipe = load_recipe("fp32").model_dump(mode="json", exclude_unset=True)
    recipe.update(name="fp32-relaxed-4x", slicing={"grid": "relaxed", "downsample_mode": "4x"},
                  targets={"onnx": recipe["targets"]["onnx"]})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--recipe", str(tmp_path / "recipe.yaml"),
                                      "--out", str(tmp_path), "--name", "r"])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "r"
    manifest = json.loads((bundle / "manifest.json").read_text())
    processor = json.loads((bundle / "processor_config.json").read_text())["image_processor"]
    assert processor == manifest["vision"]["processor"]
    assert (processor["grid_rule"], processor["downsample_mode"], manifest["vision"]["tokens_divisor"]) == \
        ("relaxed", "4x", 4)
    assert manifest["model"]["max_seq_len"] == 10 * 256 + 512  # nine 4x slices and the overview, and text
    settings = SliceSettings.from_processor_config(processor)
    default = SliceSettings.from_processor_config({**processor, "grid_rule": "minicpmv"})
    image = check_image(600, 900)
    assert (slice_image(image, settings).grid, slice_image(image, default).grid) == ((2, 2), (1, 2))
    entry = json.loads((bundle / "report.json").read_text())["artifacts"]["onnx"]
    assert entry["passed"] and entry["faithfulness"]["metrics"]["vision_slices"] == 1 + 5 + 7
