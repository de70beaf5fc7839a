"""The bundle folder: written into a staging folder beside the target, renamed into place when complete.

An interrupted or failed export never leaves a folder that looks like a bundle: the staging
folder is hidden (".name.partial-<pid>-*") and removed on any exception, KeyboardInterrupt and
SIGTERM included. One that a killed process (SIGKILL, power loss) left behind is removed by the
next export into the same folder once its owner process is gone. An existing bundle is replaced
only when asked (force) and only by a complete one, in one rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cpm_mobile.exporter.contract import MANIFEST_FILE, REPORT_FILE, json_safe


@dataclass
class ExportResult:
    bundle: Path  # the published bundle, or the rejected folder when the check failed
    passed: bool
    report: dict[str, Any]
    manifest: dict[str, Any]
from cpm_mobile.exporter.errors import InputError

MANIFEST, REPORT = MANIFEST_FILE, REPORT_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under folder (packages such as .mlpackage included), by relative path."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative not in exclude:
            hashes[relative] = sha256_file(path)
    return hashes


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically (temp file in the same folder, then rename), with normal permissions."""
    data = json_safe(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=False, allow_nan=False)
            stream.write("\n")
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; a bundle file is read by the app's build
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# -- where a bundle goes ---------------------------------------------------------------------------

STAGING = "partial"  # .<name>.partial-<pid>-<random>: a bundle being written
RETIRED = "old"  # .<name>.old-<pid>-<random>: a replaced bundle being deleted
_WORK_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^-]+$")


def default_bundle_name(model_path: str | Path, recipe_name: str) -> str:
    from cpm_mobile.exporter.models.checkpoint import resolve_folder

    return f"{resolve_folder(model_path).name}-{recipe_name}"


def prepare_destination(final: str | Path, force: bool = False) -> Path:
    """Refuse a destination that cannot take the bundle, before any work; clear dead exports' leftovers.

    Refused (InputError): a folder that cannot be created or written, a path under a file, an
    existing file, an existing bundle unless `force`, and any other non-empty folder (force or not:
    it is not ours to replace).
    """
    final = Path(final)
    if final.name in ("", ".", "..") or final.name.startswith("."):
        raise InputError(final, "a bundle name must be a plain folder name (not empty, not hidden)")
    writable_folder(final.parent)
    for folder in (final, final.with_name(f"{final.name}.rejected")):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise InputError(folder, "exists and is not a folder; remove it or choose another --name")
    if final.is_dir() and any(final.iterdir()):
        if not (final / MANIFEST).is_file():
            raise InputError(final, "exists and is not a cpm-mobile bundle (no manifest.json); "
                             "choose another --out or --name")
        if not force:
            raise InputError(final, "a bundle is already there; pass --force to replace it "
                             "(the old one stays until the new one is complete)")
    rejected = final.with_name(f"{final.name}.rejected")
    if rejected.is_dir() and any(rejected.iterdir()) and not (rejected / MANIFEST).is_file():
        raise InputError(rejected, "exists and is not a cpm-mobile bundle (no manifest.json); choose another --name")
    remove_dead_work_folders(final)
    return final


def writable_folder(folder: str | Path) -> Path:
    """`folder` exists and takes new entries, or can be created: else an InputError saying why. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise InputError(folder, f"cannot be created: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder:
            raise InputError(folder, "exists and is not a folder")
        raise InputError(folder, f"cannot be created: {existing} is a file")
    try:  # the honest test (root passes os.access on read-only mounts and /proc): make a folder, remove it
        os.rmdir(tempfile.mkdtemp(prefix=".cpm-mobile-probe-", dir=existing))
    except OSError as exc:
        verb = "cannot be written" if existing == folder else f"cannot be created in {existing}"
        raise InputError(folder, f"{verb} ({exc.strerror or exc})") from None
    return folder


def writable_file(path: str | Path) -> Path:
    """`path` can be written as a file (its folder exists or can be created): else an InputError. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; give a file path")
    writable_folder(path.parent)
    return path


def output_folder(folder: str | Path, produces: tuple[str, ...]) -> Path:
    """A folder a command fills with `produces` and replaces as a whole: refuse one holding anything else."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is not a folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in produces)
        if foreign:
            raise InputError(folder, f"holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                             "it would be replaced as a whole: choose an empty or new folder")
    writable_folder(folder.parent)
    return folder


def remove_dead_work_folders(final: Path) -> list[Path]:
    """Remove `.<name>.partial-*` / `.<name>.old-*` folders whose owner process is gone.

    A live owner's folder is left alone (two exports into one folder must not delete each other's
    staging), and so is a folder whose name carries no owner (an older cpm-mobile's): ignored.
    """
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = _WORK_FOLDER.match(entry.name)
        if not match or match["name"] != final.name or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            modified = entry.stat().st_mtime
        except FileNotFoundError:  # its owner just finished with it
            continue
        if not _owner_alive(int(match["pid"]), modified):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _owner_alive(pid: int, folder_mtime: float) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    started = _process_start_time(pid)
    # A process that started after the folder was last written cannot have written it: the PID was reused.
    return started is None or started <= folder_mtime


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds, rounded down to the boot second) from /proc; None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


# -- staging and publishing --------------------------------------------------------------------------

@contextmanager
def staging_folder(final: Path) -> Iterator[Path]:
    """A hidden folder beside `final`; the caller fills it and calls `publish`. Removed on any error.

    SIGTERM (what `timeout` and CI runners send) becomes SystemExit(143) while it exists, so the
    cleanup below runs as it does for Ctrl-C instead of the process vanishing mid-write; both are
    remembered until `publish` (see _interrupts_kept).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{STAGING}-{os.getpid()}-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; it becomes the bundle folder
    try:
        with _interrupts_kept():
            yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


_pending: list[int] = []  # signals received while a staging folder exists


def raise_if_interrupted() -> None:
    """Raise the exception of a signal received while a staging folder exists, if one was."""
    if _pending:
        _raise_for(_pending[0])


def interruptible(progress: Callable[..., None]) -> Callable[..., None]:
    """A progress callback that first raises a received interrupt: every stage boundary is a place to stop."""
    def call(*args: Any, **kwargs: Any) -> None:
        raise_if_interrupted()
        progress(*args, **kwargs)
    return call


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def publish(staging: Path, final: Path) -> Path:
    """Move a complete staging folder to `final`, replacing an older bundle there in one rename.

    Every file and folder gets the mode a new file gets under the user's umask: libraries that write through
    temporary files (safetensors, mkstemp) leave 0600, and a bundle is read by the app's build and by others."""
    raise_if_interrupted()  # an interrupt a finaliser swallowed still stops the bundle from appearing
    _normal_modes(staging)
    retired = None
    try:
        with _signals_deferred():  # an interrupt between the two renames would leave no bundle at `final`
            if final.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.{RETIRED}-{os.getpid()}-", dir=final.parent))
                os.replace(final, retired / final.name)
            os.replace(staging, final)
    finally:  # a held interrupt is raised after the renames; the retired bundle still goes
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    return final


def _normal_modes(folder: Path) -> None:
    mask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def _interrupts_kept() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM SystemExit(128 + 15), and both are remembered.

    Python raises a signal's exception at whatever bytecode runs next; inside a weakref callback or a
    __del__ (torch.export's fake-tensor caches run many) the exception is printed and dropped, and the
    export would run on and publish (seen: Ctrl-C during the ONNX export, exit 0). Remembered, the
    interrupt is raised again at the next stage (`interruptible`) and before `publish`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its caller owns signal handling
        return

    def _interrupt(signum, frame):
        _pending.append(signum)
        _raise_for(signum)

    _pending.clear()
    try:
        with _handling(_interrupt):
            yield
    finally:
        _pending.clear()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done; the first one arrived is raised right after it.

    Python-level handlers, not pthread_sigmask: a mask holds a signal only from the calling thread,
    and onnxruntime's and torch's pool threads would still take it and trip the main thread's handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    with _handling(lambda signum, frame: held.append(signum)) as previous:
        yield
    if held:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(held[0])


@contextmanager
def _handling(handler: Callable[[int, Any], None]) -> Iterator[dict[int, Any]]:
    """`handler` for SIGINT and SIGTERM inside the block, the previous handlers (yielded) put back after it.
    A handler installed outside Python (getsignal None) cannot be put back: such a signal is left alone."""
    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(number) is not None}
    try:
        yield previous
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask
