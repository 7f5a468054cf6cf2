"""What identifies stored files cheaply: a SHA-256 over each file's path, size and modification time.

Reading every byte of ImageNet to notice a change would cost minutes; a replaced, grown or touched file
changes its size or mtime. The converter stamps a source split with it (a re-run notices a changed
source) and the loaders stamp the files whose bad-sample verdict they cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

__all__ = ["file_fingerprint"]


def file_fingerprint(paths: Iterable[str | os.PathLike], salt: bytes = b"") -> str:
    """Hex SHA-256 of ``salt`` and of (path, size, mtime in ns) of every path, in order; a path that cannot
    be stat'ed is stamped as missing (its absence is a change too)."""
    h = hashlib.sha256(salt)
    for path in paths:
        name = os.fsdecode(path)
        try:
            st = os.stat(path)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{name}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
