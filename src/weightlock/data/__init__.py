"""Data, the first step of the flow: the built-in corpus, user data loaders, the tokenizer and packing into
token blocks (what ``weightlock.train`` trains on and ``weightlock.eval`` scores)."""
from .corpus import DOMAINS, SPLITS, Document, corpus_stats, documents
from .loaders import load_documents, load_texts
from .packing import load_blocks, pack_texts
from .tokenizer import builtin_tokenizer, load_tokenizer

__all__ = ["DOMAINS", "SPLITS", "Document", "corpus_stats", "documents", "load_documents", "load_texts",
           "load_blocks", "pack_texts", "builtin_tokenizer", "load_tokenizer"]
