"""Shared fixtures: small synthetic checkpoints in the real layouts."""
from __future__ import annotations

import torch

torch.manual_seed(0)
# Two threads in each of the suite's two pytest-xdist workers too: the fp16-state bounds of the Core ML tests
# were measured with torch's two-thread summation order (one thread moves blockffn's by 2x, past its bound).
torch.set_num_threads(2)

# Small but complete versions of the real shapes: every feature of the family, fewer/narrower layers.
TINY_GQA = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
TINY_MLA = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                q_lora_rank=64, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
TINY_BLOCKFFN = dict(TINY_MLA, num_experts=8, expert_size=16)


import json
import shutil
from pathlib import Path

import pytest

TOKENIZER_TEXT = (
    "The interpreter reads a program and executes it. A list comprehension builds a list. "
    "Exceptions are raised when an error occurs; the except clause handles them. "
    "Functions, classes and modules are objects. Names are bound to objects in namespaces. "
) * 20


def train_test_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """A small byte-level BPE tokenizer with MiniCPM's special ids (<unk>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([TOKENIZER_TEXT], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
    }))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def with_tokenizer(checkpoint: Path, tokenizer_folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, checkpoint / name)
    return checkpoint


def target_spec(target: str, **fields):
    """A typed target spec as a recipe would give it (no bounds: tests judge the numbers themselves)."""
    from cpm_mobile.recipes.schema import SPEC_TYPES

    return SPEC_TYPES[target].model_validate({"faithfulness": {}, "fidelity": {}, **fields})


def short_recipe(name: str, targets=None, max_seq_len: int | None = None, **check):
    """A shipped recipe with a shorter check plan (`check` fields), and optionally fewer targets or a shorter
    max_seq_len: fixtures export in seconds while every tolerance stays the shipped one."""
    from cpm_mobile.recipes import load_recipe

    recipe = load_recipe(name)
    if targets is not None:
        recipe = recipe.select(list(targets))
    update = {"check": recipe.check.model_copy(update=check)}
    if max_seq_len is not None:
        update["max_seq_len"] = max_seq_len
    return recipe.model_copy(update=update)


# The groups that take longest (measured: `python -m pytest --durations=0`, summed per group), dealt to the two
# workers first. xdist orders groups by their number of tests, which put the 24-layer fixtures (3 and 4 tests,
# 400 and 200 s) last, on one worker, while the other idled.
LONGEST_GROUPS = ("test_twin_spread", "test_two_gates", "test_minicpmv", "test_quant_executorch", "test_estimate",
                  "test_qwen35")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class LongestFirst(LoadGroupScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "_longest_first", False):
                self._longest_first = True
                for group in reversed(LONGEST_GROUPS):
                    if group in self.workqueue:
                        self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's loadgroup, keep each module on one worker (its module-scoped fixtures are built
    once). The embedded bundles' readers are dealt test by test instead: the bundles are shared between the
    workers on disk (embedded_bundle), so no reader needs the worker that exported its bundle."""
    for item in items:
        groups = {mark.args[0] for mark in item.iter_markers("xdist_group")}
        if not groups:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        elif groups <= {EMBEDDED_BUNDLES, BLOCKFFN_BUNDLES}:
            item.add_marker(pytest.mark.xdist_group(item.nodeid))


# -- embedded bundles, exported once per session and shared by the modules that only read them ---------------

EMBEDDED_MODELS = ("minicpm-tiny", "blockffn-tiny")
EMBEDDED_BUNDLES = "embedded_bundles"  # the xdist group of the modules that read the shared bundles
BLOCKFFN_BUNDLES = "blockffn_bundles"  # added to those reading blockffn-tiny's (pytest_collection_modifyitems)
# Each recipe's check plan in the shared bundles: the tolerances stay the shipped ones. fp32 keeps its three
# 64-token prompts (the apps' runners must reproduce them), coreml-fp16 its whole plan (its KL gate).
BUNDLE_PLANS = {
    "fp32": dict(heldout_windows=4),
    "coreml-fp16": {},
    "int4-sparse": dict(first_prompt=True, max_new_tokens=24, heldout_windows=2, heldout_tokens=128),
}
DEFAULT_BUNDLE_PLAN = dict(first_prompt=True, max_new_tokens=8, heldout_windows=2, heldout_tokens=128)


def bundle_recipe(name: str):
    """A shipped recipe with the shared bundles' check plan for it."""
    plan = dict(BUNDLE_PLANS.get(name, DEFAULT_BUNDLE_PLAN))
    first_prompt = plan.pop("first_prompt", False)
    recipe = short_recipe(name, **plan)
    if first_prompt:
        recipe = recipe.model_copy(update={"check": recipe.check.model_copy(update={"prompts": recipe.check.prompts[:1]})})
    return recipe


@pytest.fixture(scope="session")
def embedded_bundle(tmp_path_factory, worker_id):
    """embedded_bundle(model, recipe) -> ExportResult of the embedded model exported with the shipped recipe
    (bundle_recipe's plan), once per session for all xdist workers: the first to ask exports it into the
    workers' common temporary folder under a file lock, the others wait for it and read it from disk. Read it;
    never change its files. Its modules carry `pytest.mark.xdist_group(EMBEDDED_BUNDLES)`."""
    from filelock import FileLock

    from cpm_mobile.exporter.bundle import ExportResult
    from cpm_mobile.exporter.defaults import EMBEDDED
    from cpm_mobile.exporter.pipeline import export_bundle

    base = tmp_path_factory.getbasetemp()
    shared = (base if worker_id == "master" else base.parent) / "embedded-bundles"
    shared.mkdir(exist_ok=True)
    read = {}

    def get(model: str, recipe: str):
        if (model, recipe) not in read:
            out = shared / f"{model}-{recipe}"
            with FileLock(f"{out}.lock"):
                published = out / "published.json"
                if not published.is_file():
                    result = export_bundle(EMBEDDED / model, bundle_recipe(recipe), out)
                    published.write_text(json.dumps({"bundle": str(result.bundle)}))
            bundle = Path(json.loads(published.read_text())["bundle"])
            report = json.loads((bundle / "report.json").read_text())
            read[model, recipe] = ExportResult(bundle, report["passed"], report,
                                               json.loads((bundle / "manifest.json").read_text()))
        return read[model, recipe]

    return get
