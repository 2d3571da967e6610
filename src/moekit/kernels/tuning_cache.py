"""Tuned kernel configs on disk, so a second process on the same machine does not tune again.

One JSON file per GPU name and triton version, in ``OPTIONS.cache_dir`` (default ``$XDG_CACHE_HOME/moekit``,
else ``~/.cache/moekit``), under ``tuning/``. It maps "kernel|key" to the chosen launch config::

    {"version": 1, "entries": {"_up_proj_kernel[gated]@<source hash>|(<key values>)": {"BLOCK_M": 128, ...}}}

The kernel part holds a hash of the kernel's source (with its jit dependencies), so an edited kernel never reads
an entry tuned for its older self; the tuner also ignores an entry that is no longer in the kernel's config space.
Several processes share the file: a writer takes an advisory lock, merges its entry into what is on disk and
replaces the file atomically (write to a temporary file, then ``os.replace``), so a reader never sees half a file
and no writer drops another's entries. A cache that cannot be read or written is skipped with one warning: the
kernels then tune in every process, as without a cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings

from ..options import OPTIONS

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: atomic replace only
    fcntl = None

_VERSION = 1


def cache_dir() -> str:
    """Where moekit keeps its caches: ``OPTIONS.cache_dir`` (read at each call), else the user's cache directory."""
    if OPTIONS.cache_dir:
        return OPTIONS.cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moekit")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unknown"


class TuningCache:
    """The entries of one (GPU name, triton version) file, read lazily and re-read on a miss."""

    def __init__(self, device_name: str, triton_version: str):
        self.name = f"{_slug(device_name)}-triton{_slug(triton_version)}.json"
        self.entries: dict[str, dict] | None = None
        self.broken = False

    @property
    def path(self) -> str:
        return os.path.join(cache_dir(), "tuning", self.name)

    def _read(self) -> dict[str, dict]:
        try:
            with open(self.path) as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            self._warn(f"cannot read {self.path} ({error})")
            return {}
        if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def lookup(self, entry: str) -> dict | None:
        """The stored config of ``entry``, or None (the file is read again on a miss: another process may have
        tuned it since)."""
        if self.broken:
            return None
        if self.entries is None or entry not in self.entries:
            self.entries = self._read()
        return self.entries.get(entry)

    def store(self, entry: str, config: dict) -> None:
        """Merge ``entry`` into the file under the lock and replace the file atomically."""
        if self.broken:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with self._locked():
                entries = self._read()
                entries[entry] = config
                self._write(entries)
            self.entries = entries
        except OSError as error:
            self._warn(f"cannot write {self.path} ({error})")

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path + ".lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: dict[str, dict]) -> None:
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tuning-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": _VERSION, "entries": entries}, handle, indent=0, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _warn(self, why: str) -> None:
        self.broken = True
        warnings.warn(f"moekit: tuning cache disabled for this process: {why}", RuntimeWarning, stacklevel=3)
