import json

import pytest
import torch

from weightlock.data import corpus_stats, documents, load_blocks, load_documents, pack_texts
from weightlock.data.corpus import split_of
from weightlock.errors import WeightlockError


@pytest.mark.parametrize("domain", ["code", "tests", "prose"])
def test_builtin_splits_disjoint_deterministic_and_complete(domain):
    names = {s: [d.name for d in documents(domain, s)] for s in ("train", "validation", "test")}
    assert all(names.values()), "every split must hold documents"
    sets = {s: set(v) for s, v in names.items()}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert set().union(*sets.values()) == {d.name for d in documents(domain)}
    # deterministic: same order on a second call, and split_of is a pure function of the name
    assert [d.name for d in documents(domain, "validation")] == names["validation"]
    assert all(split_of(n, domain) == "test" for n in names["test"])


def test_domains_are_disjoint_and_code_excludes_tests():
    code = {d.name for d in documents("code")}
    tests = {d.name for d in documents("tests")}
    assert not code & tests
    assert all("/test/" in "/" + n or "/tests/" in "/" + n or "idle_test" in n for n in tests)
    assert any(n.startswith("topics/") for n in (d.name for d in documents("prose")))


def test_corpus_stats_sizes_are_consistent():
    stats = corpus_stats()
    assert set(stats) == {"code", "tests", "prose"}
    assert stats["code"]["train"]["characters"] > 5_000_000
    assert stats["prose"]["validation"]["documents"] >= 3


def test_builtin_union_spec_and_unknown_domain():
    prose = load_documents("builtin:prose", "validation")
    both = load_documents("builtin:code+prose", "validation")
    assert {d.name for d in prose} < {d.name for d in both}
    with pytest.raises(WeightlockError, match="unknown built-in domain 'poetry'"):
        load_documents("builtin:poetry")
    with pytest.raises(WeightlockError, match="unknown split"):
        load_documents("builtin:code", "dev")


def _text(i):
    return f"document number {i}\n" + "some line of text\n" * 30


def test_txt_file_and_folder(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(_text(i) for i in range(200)))
    docs = load_documents(str(f))
    assert len(docs) > 5  # a single file is chunked so it can be split
    assert "".join(sorted(d.text for d in docs)) == "".join(sorted(d.text for d in docs))
    parts = {s: load_documents(str(f), s) for s in ("train", "validation", "test")}
    assert sum(len(v) for v in parts.values()) == len(docs)
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    for i in range(120):
        (folder / ("sub" if i % 2 else ".") / f"d{i}.txt").write_text(_text(i))
    assert len(load_documents(str(folder))) == 120


def test_jsonl_parquet_and_saved_dataset(tmp_path):
    rows = [{"text": _text(i)} for i in range(120)]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert sorted(d.text for d in load_documents(str(j))) == sorted(r["text"] for r in rows)

    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "id": list(range(120))}), p)
    assert sorted(d.text for d in load_documents(str(p))) == sorted(r["text"] for r in rows)

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert sorted(d.text for d in load_documents(str(tmp_path / "saved"))) == sorted(r["text"] for r in rows)
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_list(rows[:3])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_documents(str(tmp_path / "dd"), "validation")) == 3
    with pytest.raises(WeightlockError, match="not 'test'"):
        load_documents(str(tmp_path / "dd"), "test")


def test_loader_errors_name_the_path(tmp_path):
    with pytest.raises(WeightlockError, match="no such file"):
        load_documents(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(WeightlockError, match="empty.txt: contains no text"):
        load_documents(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(WeightlockError, match=r"bad.jsonl:2: invalid JSON"):
        load_documents(str(bad))
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "x"}\n')
    with pytest.raises(WeightlockError, match=r"notext.jsonl:1: expected an object with a string field 'text'"):
        load_documents(str(notext))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(WeightlockError, match="latin.txt: not UTF-8"):
        load_documents(str(latin))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(WeightlockError, match="corrupt.parquet: unreadable"):
        load_documents(str(corrupt))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(WeightlockError, match="holds no .txt"):
        load_documents(str(tmp_path / "nothing"))
    odd = tmp_path / "x.csv"
    odd.write_text("a,b")
    with pytest.raises(WeightlockError, match="unsupported file type"):
        load_documents(str(odd))


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    assert len(tokenizer) == 4096
    for text in ["def f(x):\n    return x ** 2  # café ü 😀\n", "The for statement is used to iterate."]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    # code is compressed well: far fewer tokens than bytes
    code = documents("code", "validation")[0].text
    assert len(tokenizer(code)["input_ids"]) < len(code.encode()) / 2.5


def test_tokenizer_training_is_deterministic(tmp_path, monkeypatch, tokenizer):
    from weightlock.data.tokenizer import builtin_tokenizer

    monkeypatch.setenv("WEIGHTLOCK_CACHE", str(tmp_path))
    again = builtin_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert list(tmp_path.glob("tokenizers/*/tokenizer.json")), "the tokenizer is cached on disk"
    with pytest.raises(WeightlockError, match="vocab size"):
        builtin_tokenizer(10)


def test_packing_eos_separators_and_budget(tokenizer):
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    lens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    blocks = pack_texts(texts, tokenizer, block_size=3)
    assert blocks.shape == (sum(lens) // 3, 3) and blocks.dtype == torch.long
    flat = blocks.reshape(-1).tolist()
    eos = tokenizer.eos_token_id
    assert flat[lens[0] - 1] == eos and flat[lens[0] + lens[1] - 1] == eos
    assert pack_texts(texts, tokenizer, block_size=2, max_tokens=4).shape == (2, 2)
    with pytest.raises(WeightlockError, match="block size"):
        pack_texts(texts, tokenizer, block_size=1)


def test_load_blocks_is_cached_and_identical(tokenizer):
    a = load_blocks("builtin:prose", "validation", tokenizer, 64, max_tokens=5000)
    b = load_blocks("builtin:prose", "validation", tokenizer, 64, max_tokens=5000)
    assert a.shape == (5000 // 64, 64) and torch.equal(a, b)
    with pytest.raises(WeightlockError, match="too little text"):
        load_blocks("builtin:prose", "validation", tokenizer, 10**7)


def test_packing_with_special_tokens_wraps_every_block(tokenizer, tmp_path):
    """Encoders see calibration text as in use: every block is [CLS] … [SEP]; tokenizers without
    special tokens (the built-in one) pack exactly as before."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    bert = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    texts = ["alpha beta gamma", "delta epsilon zeta alpha", "beta gamma delta epsilon"]
    stream = [i for t in texts for i in bert(t, add_special_tokens=False)["input_ids"] + [bert.sep_token_id]]
    assert len(stream) == 14 and bert.unk_token_id not in stream
    plain = pack_texts(texts, bert, block_size=5)
    wrapped = pack_texts(texts, bert, block_size=5, specials=True)
    assert plain.reshape(-1).tolist() == stream[:10] and wrapped.shape == (4, 5)
    assert (wrapped[:, 0] == bert.cls_token_id).all() and (wrapped[:, -1] == bert.sep_token_id).all()
    assert wrapped[:, 1:-1].reshape(-1).tolist() == stream[:12]
    with pytest.raises(WeightlockError, match="at least 4"):
        pack_texts(texts, bert, block_size=3, specials=True)
    assert torch.equal(pack_texts(texts, tokenizer, 4, specials=True), pack_texts(texts, tokenizer, 4))
