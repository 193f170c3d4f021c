"""Turn a data spec into documents.

A spec is either ``builtin:DOMAIN`` (``code``, ``tests``, ``prose``; join several with ``+``, e.g.
``builtin:code+prose``) or a local path:

* a ``.txt`` file, or a folder of ``.txt`` / ``.jsonl`` / ``.parquet`` files (searched recursively);
* a ``.jsonl`` file whose lines are objects with a ``text`` field;
* a ``.parquet`` file with a ``text`` column;
* a Hugging Face dataset saved with ``Dataset.save_to_disk`` (or a ``DatasetDict``: the split of that
  name is used when it exists).

User data is split like the built-in corpus (90/5/5), by a hash of each document's name; when there
are fewer than 100 documents, they are first cut at line boundaries into about 100 chunks (at least
500 characters each) so that a single file still gets train/validation/test parts.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightlockError
from .corpus import DOMAINS, SPLITS, Document, documents, order_key

_USER_FRACTIONS = (0.90, 0.95)
_MIN_DOCS = 100


def load_documents(spec: str, split: str | None = None) -> list[Document]:
    """Documents for ``spec`` (see module doc), restricted to ``split`` if given."""
    if split is not None and split not in SPLITS:
        raise WeightlockError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if spec.startswith("builtin:"):
        out: list[Document] = []
        for domain in spec[len("builtin:"):].split("+"):
            if domain not in DOMAINS:
                raise WeightlockError(
                    f"unknown built-in domain {domain!r} in {spec!r}; choose from {', '.join(DOMAINS)}"
                )
            out.extend(documents(domain, split))
        out.sort(key=lambda d: order_key(d.name))
        return out
    path = Path(spec)
    docs = _read_path(path, split)
    if (path / "dataset_dict.json").exists():  # the dataset brings its own splits
        return sorted(docs, key=lambda d: order_key(d.name))
    if len(docs) < _MIN_DOCS:
        size = max(500, sum(len(d.text) for d in docs) // _MIN_DOCS)
        docs = [c for d in docs for c in _chunks(d, size)]
    if split is not None:
        docs = [d for d in docs if _user_split(d.name) == split]
        if not docs:
            raise WeightlockError(f"{spec}: no text falls in the {split!r} split; provide more text")
    docs.sort(key=lambda d: order_key(d.name))
    return docs


def load_texts(spec: str, split: str | None = None) -> list[str]:
    """The texts of :func:`load_documents` (``spec``, ``split``) without their names."""
    return [d.text for d in load_documents(spec, split)]


def _user_split(name: str) -> str:
    import hashlib

    u = int.from_bytes(hashlib.sha256(f"user:{name}".encode()).digest()[:8], "big") / 2**64
    a, b = _USER_FRACTIONS
    return "train" if u < a else "validation" if u < b else "test"


def _chunks(doc: Document, chunk_chars: int) -> list[Document]:
    out, buf, size = [], [], 0
    for line in doc.text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= chunk_chars:
            out.append(Document(f"{doc.name}#{len(out)}", "".join(buf)))
            buf, size = [], 0
    if buf:
        out.append(Document(f"{doc.name}#{len(out)}", "".join(buf)))
    return out


def _read_path(path: Path, split: str | None) -> list[Document]:
    if not path.exists():
        raise WeightlockError(f"{path}: no such file or directory (expected a .txt/.jsonl/.parquet file, "
                              "a folder of them, a saved Hugging Face dataset, or builtin:code|tests|prose)")
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            docs = _read_hf_saved(path, split)
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet") and p.is_file())
            if not files:
                raise WeightlockError(f"{path}: folder holds no .txt, .jsonl or .parquet files")
            docs = [d for f in files for d in _read_file(f, name_prefix=f.relative_to(path).as_posix())]
    else:
        docs = _read_file(path, name_prefix=path.name)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise WeightlockError(f"{path}: contains no text")
    return docs


def _read_file(path: Path, name_prefix: str) -> list[Document]:
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path, name_prefix)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return _table_docs(pq.read_table(path), path, name_prefix)
        if path.suffix in (".txt", ".md", ".py", ".text"):
            return [Document(name_prefix, path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError as e:
        raise WeightlockError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise WeightlockError(f"{path}: cannot read ({e.strerror or e})") from None
    except WeightlockError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise WeightlockError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    raise WeightlockError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .parquet)")


def _read_jsonl(path: Path, name_prefix: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WeightlockError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                got = json.dumps(obj.get("text")) if isinstance(obj, dict) else type(obj).__name__
                raise WeightlockError(f"{path}:{i}: expected an object with a string field 'text' (got {got})")
            docs.append(Document(f"{name_prefix}:{i}", obj["text"]))
    return docs


def _table_docs(table, path: Path, name_prefix: str) -> list[Document]:
    if "text" not in table.column_names:
        raise WeightlockError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return [Document(f"{name_prefix}:{i}", t) for i, t in enumerate(table.column("text").to_pylist())
            if isinstance(t, str)]


def _read_hf_saved(path: Path, split: str | None) -> list[Document]:
    """Read a ``save_to_disk`` folder with pyarrow alone (no ``datasets`` import needed)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        want = split or "train"
        if want not in names:
            raise WeightlockError(f"{path}: dataset has splits {names}, not {want!r}")
        return _read_hf_saved(path / want, None)
    try:
        state = json.loads((path / "state.json").read_text())
        tables = []
        for entry in state["_data_files"]:
            with pa.memory_map(str(path / entry["filename"])) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
    except (OSError, KeyError, json.JSONDecodeError, pa.ArrowInvalid) as e:
        raise WeightlockError(f"{path}: not a readable saved Hugging Face dataset ({e})") from None
    return _table_docs(pa.concat_tables(tables), path, path.name)
