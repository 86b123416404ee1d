"""Documents of a JSON Lines corpus: one JSON object a line with a "text" field, plain or compressed.

Files are read in the order given, lines in file order. `.xz`/`.lzma` are read with lzma, `.gz` with gzip,
`.zst` with zstandard; anything else as plain UTF-8.
"""

import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

from pgolf.errors import UserError


def open_text(path) -> io.TextIOBase:
    """Open a (possibly compressed) text file for reading as UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: corpus file not found")
    name = path.name.lower()
    if name.endswith((".xz", ".lzma")):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl_records(paths) -> Iterator[tuple[str, int, dict]]:
    """Yield (file, line number, object) for each non-blank line of each file, in order."""
    for path in paths:
        with open_text(path) as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno}: bad JSON line ({e.msg})") from None
                    yield str(path), lineno, obj
            except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
                raise UserError(f"{path}: cannot read corpus file ({type(e).__name__}: {e})") from None


def iter_documents(paths) -> Iterator[str]:
    """Yield each document's "text", over the files in order."""
    for path, lineno, obj in iter_jsonl_records(paths):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path}:{lineno}: JSON line has no string field \"text\"")
        yield obj["text"]
