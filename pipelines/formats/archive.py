"""A dataset archive read in place: members of the official .tar.gz, or of its extracted folder.

CIFAR and STL-10 ship as one tar archive each; reading members straight from it spares users a 2.7 GB
extraction, and the same reader serves a folder they already extracted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .source import SourceError

__all__ = ["Archive", "find_archive"]


class Archive:
    """Members of a dataset archive, read from the .tar.gz itself or from its extracted folder."""

    def __init__(self, root: Path, tar: Path | None) -> None:
        self.root, self.tar = root, tar

    def describe(self) -> str:
        return str(self.tar or self.root)

    def stamp_paths(self, members: list[str]) -> list[str]:
        """The files a fingerprint stamps: the archive itself, or the extracted members."""
        return [str(self.tar)] if self.tar is not None else [str(self.root / m) for m in members]

    def open(self, member: str) -> Any:
        """A binary file object for ``member`` (a path inside the archive's top folder)."""
        if self.tar is None:
            return open(self.root / member, "rb")
        import tarfile

        try:
            tf = tarfile.open(self.tar, "r:*")
        except (OSError, EOFError, tarfile.TarError) as e:
            raise SourceError(f"{self.tar}: cannot read the archive ({e})") from None
        try:
            f = tf.extractfile(f"{self.root.name}/{member}")
        except KeyError:
            tf.close()
            raise SourceError(f"{self.tar}: archive has no member {self.root.name}/{member}") from None
        if f is None:
            tf.close()
            raise SourceError(f"{self.tar}: {self.root.name}/{member} is not a regular file")
        return ClosingReader(f, tf)

    def has(self, member: str) -> bool:
        if self.tar is None:
            return (self.root / member).is_file()
        return f"{self.root.name}/{member}" in self._tar_names()

    def _tar_names(self) -> set[str]:
        import tarfile

        if not hasattr(self, "_names"):
            with tarfile.open(self.tar, "r:*") as tf:
                self._names = set(tf.getnames())
        return self._names


class ClosingReader:
    """A tar member that closes its archive with it."""

    def __init__(self, f: Any, owner: Any) -> None:
        self.f, self.owner = f, owner

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self) -> ClosingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        self.owner.close()


def find_archive(src: Path | None, folder: str, archive: str, members: list[str], download: Callable[[Path], None],
                  out: Path | None, dataset: str) -> Archive:
    """Locate ``archive`` (or its extracted ``folder``) at ``src``, or download it when ``src`` is None."""
    expected = (f"{dataset}: expected the official archive {archive} or its extracted folder {folder}/ "
                f"(with {', '.join(members)})")
    if src is None:
        root = (out or Path("data")) / ".downloads"
        try:
            download(root)
        except Exception as e:  # no network, mirror down, disk full: say what to do instead
            raise SourceError(f"{expected}; --src was not given and downloading with torchvision into {root} "
                              f"failed ({type(e).__name__}: {e}). Download it elsewhere and pass --src PATH.") from e
        src = root
    if not src.exists():
        raise SourceError(f"--src {src} does not exist; {expected}")
    candidates: list[tuple[Path, Path | None]] = []
    if src.is_file():
        candidates.append((src.parent / folder, src))
    else:
        candidates += [(src, None), (src / folder, None)] if src.name == folder else [(src / folder, None)]
        if (src / archive).is_file():
            candidates.append((src / folder, src / archive))
    import tarfile

    for root, tar in candidates:
        arch = Archive(root, tar)
        try:
            if all(arch.has(m) for m in members):
                return arch
        except (OSError, EOFError, tarfile.TarError) as e:
            why = "not a tar archive, compressed or plain" if isinstance(e, tarfile.ReadError) else str(e)
            raise SourceError(f"{tar}: cannot read the archive ({why}); {expected}") from None
    raise SourceError(f"--src {src}: {expected}")
