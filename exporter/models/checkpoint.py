"""Read a checkpoint folder strictly: find its files, read tensors safely, map names, check shapes.

Accepted layouts (all as Hugging Face writes them): config.json with model.safetensors, sharded
*.safetensors with model.safetensors.index.json, pytorch_model.bin (read weights-only) and its
sharded index, and a hub cache folder (models--org--name or one of its snapshots) used as it is.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.config import ModelConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Buffers some exporters save that the module recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class CheckpointFiles:
    folder: Path
    config: Path
    weights: list[Path]
    index: Path | None = None


@dataclass
class Checkpoint:
    """A validated checkpoint: its config and a state dict named as CausalLM names it."""

    files: CheckpointFiles
    config: ModelConfig
    state: dict[str, torch.Tensor]
    tied: bool
    dtypes_on_disk: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.files.folder

    def sha256(self) -> str:
        """Hash of config.json and every weight file, in a fixed order."""
        digest = hashlib.sha256()
        for path in [self.files.config, *sorted(self.files.weights)]:
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()


def resolve_folder(path: str | Path) -> Path:
    """The folder holding config.json; a hub cache repo folder resolves to its current snapshot."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(path, "no such checkpoint folder")
    if path.is_file():
        raise InputError(path, "expected a checkpoint folder (holding config.json), got a file")
    snapshots = path / "snapshots"
    if not (path / "config.json").exists() and snapshots.is_dir():
        ref = path / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise InputError(snapshots, "hub cache folder holds no snapshot")
        return candidates[-1]
    return path


def find_files(path: str | Path) -> CheckpointFiles:
    folder = resolve_folder(path)
    config = folder / "config.json"
    if not config.is_file():
        raise InputError(config, "config.json not found")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.exists():
            return CheckpointFiles(folder, config, _shards_from_index(index), index)
    single = folder / "model.safetensors"
    if single.exists():
        return CheckpointFiles(folder, config, [single])
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return CheckpointFiles(folder, config, others)
    if (folder / "pytorch_model.bin").exists():
        return CheckpointFiles(folder, config, [folder / "pytorch_model.bin"])
    raise InputError(folder, "no weights found (model.safetensors, *.safetensors with an index, or pytorch_model.bin)")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(index, f"not a valid weight index ({type(exc).__name__}: {exc})") from None
    shards = [index.parent / name for name in shard_names]
    for shard in shards:
        if not shard.is_file():
            raise InputError(shard, f"shard listed in {index.name} is missing")
    return shards


def read_tensors(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one weight file (those whose name `keep` accepts: a safetensors file reads only
    those). .bin files are read weights-only: pickled code is refused."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path, keep)
    tensors = _read_torch_bin(path)
    return tensors if keep is None else {name: t for name, t in tensors.items() if keep(name)}


def _read_safetensors(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys() if keep is None or keep(name)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"unreadable safetensors file ({_one_line(exc)})") from None


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # torch warns about the pickle protocol of a file it then refuses or reads: the outcome is
        # the only thing the user needs, and a warning must not print around the one-line error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(path, f"refused: holds pickled objects that are not plain tensors ({_one_line(exc)[:160]})") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(path, f"unreadable PyTorch checkpoint ({_one_line(exc)[:160]})") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(path, "not a state dict of tensors")
    return loaded


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_all_tensors(files: CheckpointFiles,
                     keep: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files.weights:
        for name, tensor in read_tensors(path, keep).items():
            if name in tensors:
                raise InputError(path, f"tensor '{name}' also appears in {origin[name].name}")
            tensors[name] = tensor
            origin[name] = path
    return tensors, origin
