"""The embedded corpus, the character tokenizer, the split and the micro-batch loaders."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

import pytest
import torch

from stagewise import data
from stagewise.data import (
    DEFAULT_ALPHABET,
    CharTokenizer,
    RandomWindows,
    TokenWindows,
    embedded_text,
    fixed_windows,
    load_corpus,
    normalize_text,
    split_tokens,
)


def test_tokenizer_round_trip() -> None:
    tok = CharTokenizer()
    assert tok.vocab_size == len(DEFAULT_ALPHABET) == 96
    text = "def f(x):\n    return x ** 2  # ~`{}|\\^@$"
    ids = tok.encode(text)
    assert all(0 <= i < 96 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_tokenizer_errors() -> None:
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"character 'é' at position 2 is not in the tokenizer"):
        tok.encode("caé")
    with pytest.raises(ValueError, match=r"token id 96 is outside the vocabulary 0\.\.95"):
        tok.decode([1, 96])
    with pytest.raises(ValueError, match="alphabet repeats 'a'"):
        CharTokenizer("abca")
    small = CharTokenizer("ab\n")
    assert small.encode("ba\n") == [1, 0, 2]


def test_normalize_text() -> None:
    text = "\u201cQuoted\u201d \u2014 it\u2019s na\u00efve\u2026\tend\r\n\u2603"
    assert normalize_text(text) == '"Quoted" -- it\'s naive...    end\n'
    assert normalize_text("abcxyz", alphabet="abc") == "abc"


def test_embedded_corpus_is_large_clean_and_deterministic() -> None:
    name, text = embedded_text()
    assert "Python" in name
    assert len(text) >= 300_000
    assert set(text) <= set(DEFAULT_ALPHABET)
    assert embedded_text.__wrapped__() == (name, text)  # rebuilt from scratch: the same


def test_fallback_when_pydoc_data_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.import_module

    def no_pydoc(name: str, package: str | None = None) -> ModuleType:
        if name.startswith("pydoc_data"):
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(data.importlib, "import_module", no_pydoc)
    with caplog.at_level(logging.WARNING, logger="stagewise.data"):
        name, text = embedded_text.__wrapped__()
    assert "docstrings" in name and "pydoc_data.topics is missing" in caplog.text
    assert len(text) >= 100_000 and set(text) <= set(DEFAULT_ALPHABET)


def test_split_is_disjoint_ordered_and_spread() -> None:
    tokens = torch.arange(10_000)
    train, val = split_tokens(tokens, val_fraction=0.1, chunk_size=100)
    assert train.numel() + val.numel() == 10_000 and val.numel() == 1_000
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.all(train[1:] > train[:-1]) and torch.all(val[1:] > val[:-1])
    assert val.min() < 1_000 and val.max() >= 9_000  # spread over the text, not its tail
    again = split_tokens(tokens, val_fraction=0.1, chunk_size=100)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    with pytest.raises(
        ValueError, match=r"val_fraction must lie strictly between 0 and 1, got 1\.0"
    ):
        split_tokens(tokens, val_fraction=1.0)
    with pytest.raises(ValueError, match="use a smaller chunk_size"):
        split_tokens(torch.arange(50), chunk_size=100)


def test_load_corpus_default() -> None:
    corpus = load_corpus()
    assert corpus.vocab_size == 96
    assert corpus.train.dtype == corpus.val.dtype == torch.long
    assert corpus.train.numel() + corpus.val.numel() == len(corpus.text)
    assert 0.08 < corpus.val.numel() / len(corpus.text) < 0.12
    assert corpus.tokenizer.decode(corpus.train[:200]) == corpus.text[:200]


def test_load_corpus_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("caf\u00e9 \u201cbar\u201d\n" * 300, encoding="utf-8")
    corpus = load_corpus(path, chunk_size=64)
    assert corpus.name == str(path)
    assert corpus.text.startswith('cafe "bar"\n')
    assert corpus.tokenizer.decode(corpus.train[:11]) == 'cafe "bar"\n'


def test_random_windows_shapes_shift_and_determinism() -> None:
    tokens = torch.arange(5_000)
    batches = RandomWindows(tokens, batch_size=4, seq_len=16, seed=3)
    inputs, labels = next(batches)
    assert inputs.shape == labels.shape == (4, 16)
    assert inputs.dtype == labels.dtype == torch.long
    torch.testing.assert_close(labels, inputs + 1)  # next tokens of contiguous windows
    first, _ = next(RandomWindows(tokens, 4, 16, seed=3))
    assert torch.equal(first, inputs)
    a = RandomWindows(tokens, 4, 16, seed=3)
    b = RandomWindows(tokens, 4, 16, seed=3)
    torch.manual_seed(0)
    xs = [next(a)[0] for _ in range(5)]
    torch.manual_seed(1)  # the global RNG does not matter
    ys = [next(b)[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))
    other = next(RandomWindows(tokens, 4, 16, seed=4))[0]
    assert not torch.equal(other, inputs)
    assert iter(a) is a


def test_random_windows_data_parallel_slices() -> None:
    tokens = torch.arange(5_000)
    whole = RandomWindows(tokens, batch_size=6, seq_len=8, seed=0)
    parts = [
        RandomWindows(tokens, batch_size=2, seq_len=8, seed=0, rank=r, world_size=3)
        for r in range(3)
    ]
    for _ in range(3):
        inputs, labels = next(whole)
        pieces = [next(p) for p in parts]
        assert torch.equal(torch.cat([x for x, _ in pieces]), inputs)
        assert torch.equal(torch.cat([y for _, y in pieces]), labels)


def test_random_windows_cover_the_ends() -> None:
    tokens = torch.arange(10)
    seen = torch.cat([next(RandomWindows(tokens, 64, 8, seed=s))[1] for s in range(4)])
    assert seen.min() == 1 and seen.max() == 9


def test_fixed_windows() -> None:
    tokens = torch.arange(1_000)
    batches = fixed_windows(tokens, batch_size=4, seq_len=10, num_batches=3)
    assert len(batches) == 3
    for inputs, labels in batches:
        assert inputs.shape == labels.shape == (4, 10) and inputs.dtype == torch.long
        torch.testing.assert_close(labels, inputs + 1)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 1_000 - 11
    again = fixed_windows(tokens, 4, 10, 3)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(batches, again, strict=True))


def test_loader_errors() -> None:
    with pytest.raises(ValueError, match=r"5 tokens cannot hold a window of seq_len \+ 1 = 9"):
        RandomWindows(torch.arange(5), batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match=r"rank must lie in 0\.\.world_size-1 = 0\.\.1, got 2"):
        RandomWindows(torch.arange(50), 1, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        RandomWindows(torch.arange(50), 0, 8)
    with pytest.raises(ValueError, match="needs a 1-D token tensor"):
        fixed_windows(torch.zeros(4, 50, dtype=torch.long), 1, 8, 1)


def test_token_windows_dataset() -> None:
    dataset = TokenWindows(torch.arange(101), seq_len=10)
    assert len(dataset) == 10
    inputs, labels = dataset[9]
    assert torch.equal(inputs, torch.arange(90, 100)) and torch.equal(labels, torch.arange(91, 101))
    assert torch.equal(dataset[-1][0], inputs)
    with pytest.raises(IndexError, match="index 10 out of range for length 10"):
        dataset[10]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 10)


def test_corpus_loaders() -> None:
    corpus = load_corpus()
    x, y = next(corpus.train_batches(batch_size=2, seq_len=32, seed=0))
    assert x.shape == (2, 32)
    assert corpus.tokenizer.decode(x[0][1:]) == corpus.tokenizer.decode(y[0][:-1])
    val = corpus.val_batches(batch_size=2, seq_len=32, num_batches=3)
    assert len(val) == 3 and val[0][0].shape == (2, 32)
