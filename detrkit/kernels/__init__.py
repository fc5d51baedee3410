"""Native CPU kernels: C++ sources shipped in this folder, built on first use and loaded through ctypes.

A building block for the modules that hold a kernel's PyTorch reference (``models/deformable_attention.py``): it
imports nothing from the rest of detrkit, and nothing here runs at import.

``load(name)`` compiles ``<name>.cpp`` with the system's C++ compiler (``CXX``, else ``c++``, ``g++``,
``clang++``; no torch headers, so a build takes seconds, not the minute of ``torch.utils.cpp_extension``) with
warnings on, and caches the library in ``$DETRKIT_CACHE_DIR/kernels`` (default ``$XDG_CACHE_HOME/detrkit/kernels``,
i.e. ``~/.cache/detrkit/kernels``), keyed on the source, the flags, the compiler and its version, and the CPU
(``-march=native`` binaries only run where they were built). Once per machine, not per process: the build goes to
a temporary file renamed into the cache (a process sees a finished library or none), under a file lock, so that
processes starting together (DDP ranks) wait for one build instead of all compiling. When no library can be had,
the caller runs its reference and one ``KernelUnavailableWarning`` says why and how to fix it;
``DETRKIT_DISABLE_KERNELS=1`` chooses the reference without a warning.

Layer: building blocks. Imports nothing from detrkit.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
# A build that fails with -march=native is retried without it: some compilers (older ones on ARM) do not know it.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra")
BUILD_TIMEOUT_S = 300

# Why a kernel is or is not active (KernelLibrary.reason).
BUILT = "built"
CACHED = "loaded from cache"
DISABLED = "disabled"
NO_COMPILER = "no compiler"
BUILD_FAILED = "build failed"
LOAD_FAILED = "load failed"
INCOMPATIBLE = "incompatible"

# Lines of compiler output quoted in a warning (all of it is in the cache folder and in status()).
_QUOTED_LINES = 25

log = logging.getLogger(__name__)


class KernelUnavailableWarning(RuntimeWarning):
    """A native kernel could not be used; the slower reference implementation runs instead."""


class KernelMismatchError(RuntimeError):
    """A library does not match its Python side (ABI version, struct layout): it must not be called."""


@dataclasses.dataclass(frozen=True)
class KernelLibrary:
    """The outcome of ``load``/``build``: the library (None when the reference must run) and why."""

    name: str
    lib: ctypes.CDLL | None
    reason: str  # BUILT, CACHED, DISABLED, NO_COMPILER, BUILD_FAILED, LOAD_FAILED or INCOMPATIBLE
    detail: str  # one human sentence: the library's path, or what went wrong
    library_path: Path | None = None  # the cached library (None when there is none)
    compiler: str | None = None
    compiler_version: str | None = None
    command: str | None = None  # the build command, when one ran (now or when the cached library was built)
    compiler_output: str = ""  # its stdout + stderr: warnings on success, errors on failure

    @property
    def active(self) -> bool:
        return self.lib is not None

    def status(self) -> dict[str, str | None]:
        """JSON-ready summary: ``path`` is ``"cpu-kernel"`` or ``"reference"``, ``reason`` says why."""
        return {
            "kernel": self.name,
            "path": "cpu-kernel" if self.active else "reference",
            "reason": self.reason,
            "detail": self.detail,
            "library": None if self.library_path is None else str(self.library_path),
            "compiler": self.compiler,
            "compiler_version": self.compiler_version,
            "command": self.command,
            "compiler_output": self.compiler_output,
        }


def cache_dir() -> Path:
    """Where built libraries live: ``$DETRKIT_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/detrkit/kernels``."""
    root = os.environ.get("DETRKIT_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detrkit" / "kernels"


def find_compiler() -> list[str] | None:
    """The compiler command: ``CXX`` (may carry arguments, e.g. ``ccache g++``), else the first of ``c++``,
    ``g++``, ``clang++`` on PATH; None when there is none. ``CXX`` is returned even if it names nothing runnable:
    ``build`` then reports it."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shlex.split(cxx)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def compiler_version(compiler: list[str]) -> str | None:
    """The compiler's ``--version`` output (part of the cache key); None when it cannot be run at all."""
    try:
        r = subprocess.run([*compiler, "--version"], capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    version = (r.stdout or r.stderr).strip() if r.returncode == 0 else ""
    return version or f"unknown (--version exited {r.returncode})"


def cpu_info() -> dict[str, str | set[str]]:
    """``model`` (e.g. "AMD EPYC 9R14 96-Core Processor") and ``flags`` (e.g. {"avx2", "avx512_bf16", ...}) of the
    first CPU in /proc/cpuinfo; ``platform.processor()`` and no flags where there is no /proc (macOS)."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            if model and flags:
                break
    return {"model": model or platform.processor() or platform.machine(), "flags": flags}


def _cache_key(source: bytes, compiler: list[str], version: str, flags: tuple[str, ...]) -> str:
    # -march=native binaries only run on CPUs with the builder's features: the flags are part of the key.
    cpu = sorted(cpu_info()["flags"]) or [platform.processor()]
    h = hashlib.sha256(source)
    h.update("\0".join([*compiler, version, *flags, platform.machine(), *cpu]).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and threads: each opens its own file), released if the holder dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a") as f:  # "a": never truncates
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    name: str,
    *,
    cache: Path,
    compiler: list[str] | None,
    flags: tuple[str, ...] = FLAGS,
    source: Path | None = None,
    validate: Callable[[ctypes.CDLL], None] | None = None,
) -> KernelLibrary:
    """Loads ``name``'s library from ``cache``, building it first if needed; never raises, never warns.

    ``source`` defaults to ``<name>.cpp`` in this folder. ``validate(lib)`` raises (``KernelMismatchError``) when
    the library does not fit its Python side; the result is then inactive (``INCOMPATIBLE``).
    """
    source = source or SOURCE_DIR / f"{name}.cpp"
    if compiler is None:
        detail = "no C++ compiler: CXX is unset and there is no c++, g++ or clang++ on PATH"
        return KernelLibrary(name, None, NO_COMPILER, detail)
    shown = shlex.join(compiler)
    version = compiler_version(compiler)
    if version is None:
        return KernelLibrary(name, None, NO_COMPILER, f"the C++ compiler {shown!r} cannot be run", compiler=shown)
    info = {"compiler": shown, "compiler_version": version.splitlines()[0]}
    stem = f"{name}-{_cache_key(source.read_bytes(), compiler, version, flags)}"
    lib_path, log_path, fail_path = (cache / f"{stem}{ext}" for ext in (".so", ".log", ".failed"))
    if lib_path.exists():
        return _open(name, lib_path, log_path, CACHED, str(lib_path), validate, info)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return KernelLibrary(name, None, BUILD_FAILED, f"cannot create the cache folder {cache}: {e}", **info)
    waiting_since = time.time()
    with _file_lock(cache / f"{stem}.lock"):
        if lib_path.exists():
            detail = f"{lib_path} (built by another process while this one waited)"
            return _open(name, lib_path, log_path, CACHED, detail, validate, info)
        # A build that failed while this process waited for the lock is not repeated (N ranks, one failure); an
        # older failure is retried, since the user may have fixed its cause.
        with contextlib.suppress(OSError):
            if fail_path.stat().st_mtime >= waiting_since - 1.0:
                command, output = _read_log(fail_path)
                detail = f"the build by another process failed (output in {fail_path})"
                return KernelLibrary(name, None, BUILD_FAILED, detail, **info, command=command, compiler_output=output)
        log.info("building the %s kernel with %s (once per machine, a few seconds)", name, shown)
        ok, command, output = _compile(compiler, flags, source, lib_path, cache, stem)
        with contextlib.suppress(OSError):
            (log_path if ok else fail_path).write_text(f"$ {command}\n{output}")
            if ok:
                fail_path.unlink(missing_ok=True)
    if not ok:
        detail = f"{shown} could not compile {source.name} (output in {fail_path})"
        return KernelLibrary(name, None, BUILD_FAILED, detail, **info, command=command, compiler_output=output)
    if output.strip():
        log.debug("%s compiled with output:\n%s", name, output)
    return _open(name, lib_path, log_path, BUILT, str(lib_path), validate, info)


def _compile(
    compiler: list[str], flags: tuple[str, ...], source: Path, lib_path: Path, cache: Path, stem: str
) -> tuple[bool, str, str]:
    """Compiles into a temporary file in ``cache`` and renames it to ``lib_path``: (success, command, output).

    When every attempt fails, the first one's command and output are returned (the flags as configured)."""
    attempts = [flags, tuple(f for f in flags if f != "-march=native")] if "-march=native" in flags else [flags]
    runs = []
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{stem}-") as tmp:
        tmp_lib = Path(tmp) / lib_path.name
        for attempt in attempts:
            cmd = [*compiler, *attempt, str(source), "-o", str(tmp_lib)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=BUILD_TIMEOUT_S)
                ok, output = r.returncode == 0 and tmp_lib.exists(), r.stdout + r.stderr
            except subprocess.TimeoutExpired:
                ok, output = False, f"the compiler did not finish within {BUILD_TIMEOUT_S} s"
            except OSError as e:
                ok, output = False, str(e)
            runs.append((shlex.join(cmd), output))
            if ok:
                os.replace(tmp_lib, lib_path)  # atomic: other processes see the finished library or none
                return True, *runs[-1]
    return False, *runs[0]


def _read_log(path: Path) -> tuple[str | None, str]:
    """(command, output) from a .log/.failed file written by ``build``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, ""
    first, _, rest = text.partition("\n")
    return (first[2:], rest) if first.startswith("$ ") else (None, text)


def _open(
    name: str,
    lib_path: Path,
    log_path: Path,
    reason: str,
    detail: str,
    validate: Callable[[ctypes.CDLL], None] | None,
    info: dict[str, str],
) -> KernelLibrary:
    command, output = _read_log(log_path)
    found = dict(library_path=lib_path, **info, command=command, compiler_output=output)
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:  # e.g. a cache folder on a noexec mount
        return KernelLibrary(name, None, LOAD_FAILED, f"cannot load {lib_path}: {e}", **found)
    if validate is not None:
        try:
            validate(lib)
        except Exception as e:  # whatever the check found, this library must not be called
            return KernelLibrary(name, None, INCOMPATIBLE, f"{lib_path} was refused: {e}", **found)
    return KernelLibrary(name, lib, reason, detail, **found)


def load(name: str, *, fallback: str, validate: Callable[[ctypes.CDLL], None] | None = None) -> KernelLibrary:
    """``build`` with the environment's compiler and cache folder; warns once when the kernel is unavailable.

    ``fallback`` completes the warning's first sentence: what runs instead and how much slower, e.g. "multi-scale
    deformable attention runs its PyTorch reference, 10-20x slower". Call it once per process (cache the result).
    """
    if os.environ.get("DETRKIT_DISABLE_KERNELS", "0") not in ("", "0"):
        return KernelLibrary(name, None, DISABLED, "DETRKIT_DISABLE_KERNELS is set")
    result = build(name, cache=cache_dir(), compiler=find_compiler(), validate=validate)
    if not result.active:
        warnings.warn(unavailable_message(result, fallback), KernelUnavailableWarning, stacklevel=2)
    return result


def unavailable_message(result: KernelLibrary, fallback: str) -> str:
    """The warning text: what happened, the trimmed compiler output, and how to fix it."""
    lines = [f"detrkit: the {result.name} CPU kernel is unavailable ({result.reason}): {fallback}.", result.detail]
    if result.reason == NO_COMPILER:
        fix = "install a C++17 compiler (Debian/Ubuntu: apt install g++; macOS: xcode-select --install) or set CXX"
    elif result.reason == BUILD_FAILED:
        if result.command:
            lines.append(f"$ {result.command}")
        output = result.compiler_output.rstrip().splitlines()
        lines += [line[:300] for line in output[:_QUOTED_LINES]]
        if len(output) > _QUOTED_LINES:
            lines.append(f"... ({len(output) - _QUOTED_LINES} more lines)")
        fix = (
            "the compiler output above names the cause (C++17 and GCC/Clang vector extensions are needed); install "
            "g++ or clang++ or point CXX at another compiler; a failed build is retried by the next process"
        )
    elif result.reason == LOAD_FAILED:
        fix = "point DETRKIT_CACHE_DIR at a folder where shared libraries may be loaded (not a noexec mount)"
    else:
        fix = "the library does not match detrkit's Python side: a detrkit bug, please report it"
    lines.append(f"To fix: {fix}. `detrkit doctor` shows the active path; DETRKIT_DISABLE_KERNELS=1 silences this.")
    return "\n".join(lines)


__all__ = [
    "BUILD_FAILED",
    "BUILT",
    "CACHED",
    "DISABLED",
    "FLAGS",
    "INCOMPATIBLE",
    "LOAD_FAILED",
    "NO_COMPILER",
    "KernelLibrary",
    "KernelMismatchError",
    "KernelUnavailableWarning",
    "build",
    "cache_dir",
    "cpu_info",
    "find_compiler",
    "load",
]
