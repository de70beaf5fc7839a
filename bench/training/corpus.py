"""The English training corpus of the embedded fixture models, built offline from CPython's own docs.

Why this corpus: the fixture models must be trainable by anyone, anywhere, with no download and
no licence question. Every Python installation already ships two bodies of real English prose:

* ``pydoc_data.topics``: the Language Reference topics that ``help("if")`` prints (~465 KB of
  edited technical English: statements, data model, special method names, string methods...);
* the docstrings of the standard library: written by many authors, in plain sentences.

Both are part of the interpreter (PSF licence), identical on every machine running the same
Python version, and about the right size for a model of a few million parameters trained for
minutes on two CPU cores. The text is technical, so the models learn Python-documentation English
(words like "the object", "is called", "returns a new"), which is exactly what a smoke-test model
of an exporter needs: real token statistics, real next-token structure, real activation patterns.

Determinism: documents come in a fixed order (topics sorted by key, split at their second-level
headings; then a fixed, sorted list of stdlib modules, each one document holding the module's own
docstring and the docstrings its public classes, functions and methods define themselves, in sorted
name order). Only ``__doc__`` strings defined on the object itself are read (no inherited
docstrings, no signatures or reprs, which could hold memory addresses). The documents are read in a
fresh ``python -I -S`` child process, because libraries imported earlier can patch the stdlib (torch
replaces ``inspect.getfile``), so the corpus depends on the Python version (and, for a few modules
such as os and fcntl, the platform) only; :func:`build_corpus`
records it and the corpus sha256. A module this Python lacks is skipped and listed in ``sources``.

Split: held-out documents are every ``HELDOUT_EVERY``-th document (index % 10 == 9); they are whole
documents the training loop never sees.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HELDOUT_EVERY = 10

# Fixed and sorted. Pure-Python or well-documented modules whose import has no side effects.
STDLIB_MODULES: tuple[str, ...] = (
    "_pyio",
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.futures",
    "asyncio.locks",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "binascii",
    "bisect",
    "builtins",
    "bz2",
    "calendar",
    "cmath",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "collections.abc",
    "compileall",
    "concurrent.futures._base",
    "concurrent.futures.process",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.headerregistry",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "faulthandler",
    "fcntl",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib.abc",
    "importlib.metadata",
    "importlib.resources",
    "importlib.util",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "logging.config",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing.managers",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "queue",
    "random",
    "re",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "select",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "site",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "symtable",
    "sys",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unicodedata",
    "unittest.case",
    "unittest.loader",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "wsgiref.handlers",
    "wsgiref.util",
    "wsgiref.validate",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipapp",
    "zipfile",
    "zipimport",
    "zlib",
)


@dataclass
class Corpus:
    train_docs: list[str]
    heldout_docs: list[str]
    python_version: str
    sha256: str  # of the whole corpus (every document, in order, NUL-separated)
    sources: dict = field(default_factory=dict)  # documents per source (and modules this Python lacks)

    @property
    def train_text(self) -> str:
        return "\n\n".join(self.train_docs)

    @property
    def heldout_text(self) -> str:
        return "\n\n".join(self.heldout_docs)

    def summary(self) -> dict:
        train_chars = sum(map(len, self.train_docs))
        heldout_chars = sum(map(len, self.heldout_docs))
        return {
            "python_version": self.python_version,
            "sha256": self.sha256,
            "documents": len(self.train_docs) + len(self.heldout_docs),
            "train_documents": len(self.train_docs),
            "heldout_documents": len(self.heldout_docs),
            "train_chars": train_chars,
            "heldout_chars": heldout_chars,
            "heldout_fraction": round(heldout_chars / (train_chars + heldout_chars), 4),
            "sources": dict(self.sources),
        }


_SECTION = re.compile(r"\n(?=[^\n]+\n=+\n)")


def topic_documents() -> list[str]:
    """The Language Reference topics, each split at its second-level ('====') headings."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        for part in _SECTION.split(topics[key]):
            part = _normalise(part)
            if len(part) >= 80:
                docs.append(part)
    return docs


def _own_doc(obj: object) -> str | None:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def _members(module) -> list[tuple[str, object]]:
    public = getattr(module, "__all__", None)
    names = sorted(public) if isinstance(public, (list, tuple)) else sorted(n for n in vars(module) if not n.startswith("_"))
    found = []
    for name in names:
        obj = vars(module).get(name)
        if obj is None or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in (module.__name__, None) and public is None:
            continue  # imported from elsewhere
        found.append((name, obj))
    return found


def _method_docs(cls: type) -> list[tuple[str, str]]:
    docs = []
    for name in sorted(cls.__dict__):
        if name.startswith("_") and name != "__init__":
            continue
        attr = cls.__dict__[name]
        if isinstance(attr, (classmethod, staticmethod)):
            attr = attr.__func__
        elif isinstance(attr, property):
            attr = attr.fget
        if attr is None or not (inspect.isroutine(attr)):
            continue
        doc = _own_doc(attr)
        if doc:
            docs.append((name, doc))
    return docs


def module_document(name: str, seen: set[str]) -> str | None:
    """One stdlib module's own docstrings as one document (docstrings already seen are skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    parts = []

    def add(title: str, doc: str | None, indent: str = "") -> None:
        if not doc or doc in seen:
            return
        seen.add(doc)
        body = "\n".join(indent + "    " + line if line else "" for line in doc.splitlines())
        parts.append(f"{indent}{title}\n{body}")

    add(f"Module {name}", _own_doc(module))
    for obj_name, obj in _members(module):
        kind = "class" if inspect.isclass(obj) else "function"
        add(f"{kind} {name}.{obj_name}", _own_doc(obj))
        if inspect.isclass(obj):
            for method, doc in _method_docs(obj):
                add(f"method {obj_name}.{method}", doc, indent="    ")
    if not parts:
        return None
    return _normalise("\n\n".join(parts))


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def all_documents() -> tuple[list[str], dict[str, int]]:
    """The documents, read in THIS interpreter (see :func:`build_corpus` for the isolated form)."""
    docs = topic_documents()
    sources: dict = {"pydoc_data.topics": len(docs)}
    seen: set[str] = set()
    count, missing = 0, []
    for name in STDLIB_MODULES:
        try:
            doc = module_document(name, seen)
        except ImportError:  # optional or removed in another Python version: recorded, not fatal
            missing.append(name)
            continue
        if doc:
            docs.append(doc)
            count += 1
    sources["stdlib docstrings"] = count
    if missing:
        sources["missing modules"] = missing
    return docs, sources


def isolated_documents() -> tuple[list[str], dict[str, int]]:
    """all_documents() run in a fresh interpreter (-I -S: stdlib only, no site hooks).

    Libraries imported before the corpus is read can change what it reads: torch, for one, replaces
    inspect.getfile with its own function, whose docstring is then not inspect's. A clean child
    process makes the corpus depend on the Python version only.
    """
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--dump"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},  # -I ignores the PYTHON* variables
    )
    data = json.loads(result.stdout.decode("utf-8"))
    return data["docs"], data["sources"]


def build_corpus(isolated: bool = True) -> Corpus:
    docs, sources = isolated_documents() if isolated else all_documents()
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    version = f"{platform.python_implementation()} {sys.version.split()[0]}"
    return Corpus(train, heldout, version, digest, sources)


if __name__ == "__main__":
    if sys.argv[1:] == ["--dump"]:
        docs, sources = all_documents()
        sys.stdout.buffer.write(json.dumps({"docs": docs, "sources": sources}).encode("utf-8"))
    else:
        print(json.dumps(build_corpus().summary(), indent=2))
