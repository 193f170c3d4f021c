"""The built-in corpus: the running Python's own standard library, offline and always present.

Domains
-------
``code``   the standard library's ``.py`` source files, test suites excluded
``tests``  the standard library's test suites (``test/``, ``tests/``, ``idle_test/`` folders), held out
           for domain-adaptation tasks
``prose``  ``pydoc_data.topics``: the English reference text behind ``help()``, one document per topic

Splits are by document (file or topic), from a SHA-256 hash of its name, so they are deterministic,
disjoint, and independent of file-system order: 90% ``train``, 5% ``validation``, 5% ``test`` for code
and tests; prose has only 79 topics, so it uses 70/15/15 to leave enough text to evaluate on.
"""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightlockError

SPLITS = ("train", "validation", "test")
DOMAINS = ("code", "tests", "prose")
_FRACTIONS = {"code": (0.90, 0.95), "tests": (0.90, 0.95), "prose": (0.70, 0.85)}
_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    """One document of the corpus: ``name`` identifies it (stable across machines), ``text`` is its content."""

    name: str  # stable identifier: path relative to the stdlib, or "topics/<name>"
    text: str


def split_of(name: str, domain: str) -> str:
    """The split a document belongs to, from a hash of its name (deterministic everywhere)."""
    u = int.from_bytes(hashlib.sha256(f"{domain}:{name}".encode()).digest()[:8], "big") / 2**64
    a, b = _FRACTIONS[domain]
    return "train" if u < a else "validation" if u < b else "test"


def order_key(name: str) -> str:
    """A deterministic pseudo-random order for documents (used when a token budget takes a prefix)."""
    return hashlib.sha256(f"order:{name}".encode()).hexdigest()


def stdlib_dir() -> Path:
    """The running Python's standard-library directory: the source of the built-in corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=None)
def _code_files() -> tuple[tuple[str, bool], ...]:
    root = stdlib_dir()
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        out.append((rel.as_posix(), any(p in _TEST_DIRS for p in rel.parts[:-1])))
    return tuple(sorted(out))


def _read_stdlib(rel: str) -> str | None:
    try:
        return (stdlib_dir() / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a handful of test files are deliberately mis-encoded


def documents(domain: str, split: str | None = None) -> list[Document]:
    """Documents of a built-in domain (optionally one split), in a deterministic shuffled order."""
    if domain not in DOMAINS:
        raise WeightlockError(f"unknown built-in domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if split is not None and split not in SPLITS:
        raise WeightlockError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    docs: list[Document] = []
    if domain == "prose":
        from pydoc_data.topics import topics

        for topic, text in topics.items():
            name = f"topics/{topic}"
            if split is None or split_of(name, domain) == split:
                docs.append(Document(name, text))
    else:
        want_tests = domain == "tests"
        for rel, is_test in _code_files():
            if is_test != want_tests or (split is not None and split_of(rel, domain) != split):
                continue
            text = _read_stdlib(rel)
            if text and text.strip():
                docs.append(Document(rel, text))
    docs.sort(key=lambda d: order_key(d.name))
    return docs


def corpus_stats() -> dict[str, dict[str, dict[str, int]]]:
    """Documents and characters per domain and split (the sizes quoted in the docs)."""
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for domain in DOMAINS:
        stats[domain] = {}
        for split in SPLITS:
            docs = documents(domain, split)
            stats[domain][split] = {"documents": len(docs), "characters": sum(len(d.text) for d in docs)}
    return stats
