"""One SQLite per process for the wheel (README, "Python's sqlite3 on the same file").

The wheel's `_core` leaves SQLite's symbols undefined and names no library for them: a
manylinux wheel may not depend on the system's `libsqlite3.so`, and bundling a copy would make
two SQLites in the process, whose second copy drops our locks and deletes our WAL when Python's
`sqlite3` closes the file. So before `_core` is loaded, this makes the very SQLite Python's
`_sqlite3` extension runs on visible to later loads (`RTLD_GLOBAL`), and `_core` binds to it.
A build from source links the system library instead; making it global changes nothing there.
It finds that SQLite without importing `_sqlite3`, whose import starts SQLite: `_core` turns
SQLite's memory statistics off first, which only works before (`store::sqlite`'s
`memory_statistics_off`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

_INSTALL = (
    "install the SQLite library (libsqlite3-0 on Debian and Ubuntu, sqlite-libs on Fedora, sqlite on Alpine) "
    "or build tenantllm from source (pip install --no-binary tenantllm tenantllm)"
)


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _file_of_python_sqlite3() -> tuple[bool, str | None]:
    """Whether Python has a `_sqlite3` module, and its file (None when it is built into the
    interpreter), found without running it if it has not been imported yet."""
    module = sys.modules.get("_sqlite3")
    if module is not None:
        return True, getattr(module, "__file__", None)
    spec = importlib.util.find_spec("_sqlite3")
    if spec is None:
        return False, None
    return True, spec.origin if spec.has_location else None


def _library_of_python_sqlite3() -> str | None:
    """The file (a libsqlite3, or `_sqlite3` itself when it exports a SQLite linked into it)
    whose `sqlite3_libversion` Python's `_sqlite3` is bound to; None if Python has no sqlite3 or
    keeps its SQLite's symbols private."""
    found, file = _file_of_python_sqlite3()
    if not found:
        return None
    # Loading the module's file runs none of its code (Python's import of it later finds it
    # loaded). dlsym on its handle searches the module, then the libraries it needs; a module
    # built into the interpreter has no file of its own, and the interpreter's symbols are global.
    try:
        symbol = ctypes.cast(ctypes.CDLL(file).sqlite3_libversion, ctypes.c_void_p)
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except AttributeError:  # glibc before 2.34 keeps it in libdl
        dladdr = ctypes.CDLL("libdl.so.2").dladdr
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    if not dladdr(symbol, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def load_shared_sqlite() -> None:
    """Makes Python's SQLite (else the system's) global before `_core` is loaded; ImportError
    naming what to install if there is none."""
    if sys.platform == "win32":  # Windows wheels carry their own SQLite (.github/workflows)
        return
    path = _library_of_python_sqlite3()
    if path is not None:
        # Already loaded by `_sqlite3`: RTLD_NOLOAD promotes that very copy, never a new one.
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
        return
    # No sqlite3 module, or one that keeps its SQLite private: the system library (if Python's
    # sqlite3 has its own copy, configure() warns that the two must not share a file).
    from ctypes.util import find_library  # here, not at the top: it costs ~10 ms (subprocess, shutil)

    name = find_library("sqlite3")
    if name is None:
        raise ImportError(f"tenantllm needs the SQLite library and found none, loaded or on the system: {_INSTALL}")
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise ImportError(f"tenantllm could not load the SQLite library {name} ({e}): {_INSTALL}") from e
