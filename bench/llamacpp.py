"""llama.cpp as the measured peer: built from the llama-cpp-python sdist, fed our checkpoints through
its own converter, quantised with llama-quantize, timed with llama-bench.

python -m bench.llamacpp build                         # find or build the tools (minutes, once)
python -m bench.llamacpp convert CKPT OUT.gguf         # GGUF F32 with convert_hf_to_gguf.py

The sdist's vendor/llama.cpp is the whole tree. Only llama-bench, llama-quantize, llama-perplexity, llama-imatrix
are built (cmake + ninja, 2 jobs), into CACHE (default ~/.cache/cpm-mobile/llama.cpp, or
$CPM_MOBILE_LLAMACPP), and found there on later runs.

Our checkpoints ship a byte-level BPE tokenizer.json, while the converter's MiniCPM classes read a
sentencepiece tokenizer.model. The conversion keeps the converter's MiniCPM weight and hparam code
and swaps only the vocabulary step for the converter's own GPT-2 BPE path (`_set_vocab_gpt2`,
which reads tokenizer.json through transformers and writes merges), naming the pre-tokenizer
"gpt-2" instead of looking up the sha256 of a probe encoding in its table of released models (our
tokenizer is in no table). That name is what tokenizer.json declares: a ByteLevel pre-tokenizer
with GPT-2's regex and no normaliser; anything else is refused. A checkpoint without a tokenizer
(the synthetic preset shapes) gets the embedded models' tokenizer, padded by the converter with
[PAD] tokens to the model's vocab size; llama-bench feeds random token ids, so speed is unaffected.
BlockFFN's FFN is not a llama.cpp architecture: those checkpoints are refused (UnsupportedModel).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cpm_mobile.exporter.defaults import DEFAULT_MODEL

CACHE = Path(os.environ.get("CPM_MOBILE_LLAMACPP", "~/.cache/cpm-mobile/llama.cpp")).expanduser()
TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-imatrix")
QUANT_TYPES = ("Q8_0", "Q4_0")
EMBEDDED_TOKENIZER = DEFAULT_MODEL
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class UnsupportedModel(Exception):
    """A checkpoint llama.cpp cannot run; the message says why."""


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # .../llama_cpp_python-X.Y.Z/vendor/llama.cpp
    package: str  # e.g. "llama-cpp-python 0.3.36"
    commit: str  # vendored llama.cpp commit, from the sdist's git metadata

    def tool(self, name: str) -> Path:
        return self.source / "build" / "bin" / name

    def versions(self) -> dict[str, str]:
        return {"llama.cpp": self.commit, "package": self.package}


def find_or_build(cache: Path = CACHE, jobs: int = 2, log=print) -> LlamaCpp:
    cache.mkdir(parents=True, exist_ok=True)
    sources = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not sources:
        sources = [_unpack(_download(cache, log), cache)]
    source = sources[-1]
    llama = LlamaCpp(source, f"llama-cpp-python {source.parents[1].name.split('-')[-1]}", _commit(source))
    missing = _wait_for_running_build(llama, log)
    if missing:
        log(f"building {', '.join(missing)} in {source / 'build'} (minutes)")
        _run(["cmake", "-S", str(source), "-B", str(source / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF"])
        _run(["cmake", "--build", str(source / "build"), f"-j{jobs}", "--target", *missing])
    return llama


def _wait_for_running_build(llama: LlamaCpp, log, quiet_s: float = 180) -> list[str]:
    """The tools still missing once no other build of this tree is writing to its ninja log (two
    bench runs sharing the cache would otherwise compile into the same folder at once)."""
    ninja_log = llama.source / "build" / ".ninja_log"
    waited = False
    while True:
        missing = [t for t in TOOLS if not llama.tool(t).is_file()]
        if not missing or not ninja_log.is_file() or time.time() - ninja_log.stat().st_mtime > quiet_s:
            return missing
        if not waited:
            log(f"waiting for the llama.cpp build already running in {ninja_log.parent}")
            waited = True
        time.sleep(10)


def _download(cache: Path, log) -> Path:
    log("downloading the llama-cpp-python sdist (vendored llama.cpp)")
    # Only the sdist itself from source: ":all:" would also build its build requirements (cmake,
    # scikit-build-core) from source to prepare its metadata, over 10 minutes before llama.cpp itself.
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "--quiet",
          "llama-cpp-python", "-d", str(cache)])
    return sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]


def _unpack(archive: Path, cache: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    source = cache / archive.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    (source / "VENDORED_COMMIT").write_text(commit.strip() or "unknown")
    # vendor/llama.cpp/.git is a gitlink into the sdist's git folder; with it in place the build's
    # version step regenerates build.ninja on every pass ("still dirty after 100 tries").
    if (source / ".git").exists():
        (source / ".git").rename(source / ".git.sdist")
    return source


def _commit(source: Path) -> str:
    marker = source / "VENDORED_COMMIT"
    return marker.read_text().strip() if marker.is_file() else "unknown"


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{Path(command[0]).name} failed (exit {result.returncode}):\n{tail}")
    return result


def check_supported(checkpoint: Path) -> None:
    from cpm_mobile.exporter.models import load_checkpoint

    config = load_checkpoint(checkpoint).config
    if config.ffn == "blockffn":
        raise UnsupportedModel(f"{checkpoint.name}: BlockFFN's FFN is not a llama.cpp architecture")


def convert(llama: LlamaCpp, checkpoint: Path, out: Path) -> Path:
    """GGUF F32 of a MiniCPM checkpoint folder, written by llama.cpp's convert_hf_to_gguf.py."""
    check_supported(checkpoint)
    with tempfile.TemporaryDirectory(prefix="cpm-gguf-") as temp:
        folder = _with_tokenizer(checkpoint, Path(temp))
        partial = out.with_name(out.name + ".partial")
        _run([sys.executable, "-m", "bench.llamacpp", "convert", str(folder), str(partial), "--source", str(llama.source)],
             env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                              os.environ.get("PYTHONPATH")]))})
        partial.replace(out)
    return out


def _with_tokenizer(checkpoint: Path, temp: Path) -> Path:
    if (checkpoint / "tokenizer.json").is_file() or (checkpoint / "tokenizer.model").is_file():
        return checkpoint
    folder = temp / checkpoint.name
    folder.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (folder / file.name).symlink_to(file.resolve())
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED_TOKENIZER / name, folder / name)
    return folder


def quantize(llama: LlamaCpp, f32: Path, out: Path, qtype: str, pure: bool = False) -> Path:
    partial = out.with_name(out.name + ".partial")
    _run([str(llama.tool("llama-quantize")), *(["--pure"] if pure else []), str(f32), str(partial), qtype])
    partial.replace(out)
    return out


def bench(llama: LlamaCpp, gguf: Path, threads: int, prefill: int, decode: int, repeats: int) -> dict:
    """llama-bench's prefill (pp) and decode (tg) tokens/s, and its process's peak RSS (VmHWM,
    polled while it runs: the only way to read a child's own high-water mark)."""
    command = [str(llama.tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", str(prefill),
               "-n", str(decode), "-r", str(repeats), "-o", "json"]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(process.pid))
            time.sleep(0.05)
        stdout.seek(0), stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if process.returncode:
        raise RuntimeError(f"llama-bench failed on {gguf.name}: {errors.strip().splitlines()[-1:]}")
    tests = json.loads(output)
    pp = next(t for t in tests if t["n_prompt"] == prefill and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] == decode and t["n_prompt"] == 0)
    return {
        "prefill_tokens": prefill,
        "prefill_tok_per_s": pp["avg_ts"],
        "decode_tok_per_s": tg["avg_ts"],
        "decode_ms_per_token": 1e3 / tg["avg_ts"],
        "peak_rss_mb": peak_kb / 1024,
        "build": {k: pp.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "type_k")},
    }


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, as stored in a GGUF file."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _convert_main(source: Path, folder: Path, out: Path) -> None:
    """Runs in its own process: the converter puts its own gguf-py first on sys.path and configures logging."""
    sys.path.insert(0, str(source))
    sys.argv = ["convert_hf_to_gguf.py", str(folder), "--outtype", "f32", "--outfile", str(out)]
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if "Qwen3_5ForCausalLM" in architectures:
        # our export leaves the MTP head out, and the converter asserts on a Qwen3.5 config that names none
        sys.argv.append("--no-mtp")
    import convert_hf_to_gguf
    from conversion import ModelBase, ModelType
    from conversion.minicpm import MiniCPM3Model, MiniCPMModel
    from conversion.qwen import Qwen3_5TextModel

    if not (folder / "tokenizer.model").is_file():
        _require_gpt2_pretokenizer(folder / "tokenizer.json")
        _tokenizer_without_model_config()
        for architecture, base in (("MiniCPMForCausalLM", MiniCPMModel), ("MiniCPM3ForCausalLM", MiniCPM3Model),
                                   ("Qwen3_5ForCausalLM", Qwen3_5TextModel)):
            ModelBase._model_classes[ModelType.TEXT][architecture] = type(base.__name__, (base,), {
                "model_arch": base.model_arch,
                "set_vocab": lambda self: self._set_vocab_gpt2(),
                "get_vocab_base_pre": lambda self, tokenizer: "gpt-2",
            })
    convert_hf_to_gguf.main()


def _tokenizer_without_model_config() -> None:
    """transformers cannot build a generic config from a MiniCPM config.json with LongRoPE scaling
    (model type unknown without remote code), and AutoTokenizer loads one only to find the tokenizer
    class, which our tokenizer_config.json names; so the converter's AutoTokenizer gets an empty one."""
    import transformers

    original = transformers.AutoTokenizer.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        kwargs.setdefault("config", transformers.PreTrainedConfig())
        return original(path, *args, **kwargs)

    transformers.AutoTokenizer.from_pretrained = from_pretrained


def _require_gpt2_pretokenizer(path: Path) -> None:
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or spec.get("model", {}).get("type") != "BPE":
        raise SystemExit(f"{path}: not a GPT-2 byte-level BPE tokenizer; llama.cpp's converter needs a "
                         "tokenizer.model or a pre-tokenizer it knows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build")
    convert_parser = commands.add_parser("convert")
    convert_parser.add_argument("checkpoint", type=Path)
    convert_parser.add_argument("out", type=Path)
    convert_parser.add_argument("--source", type=Path, help="vendor/llama.cpp folder (internal: bench.run passes it)")
    args = parser.parse_args()
    if args.command == "build":
        llama = find_or_build()
        print(json.dumps({**llama.versions(), **{t: str(llama.tool(t)) for t in TOOLS}}))
    elif args.source is not None:
        _convert_main(args.source, args.checkpoint, args.out)
    else:
        print(convert(find_or_build(), args.checkpoint, args.out))


if __name__ == "__main__":
    main()
