"""An embedded text corpus, a character tokenizer and micro-batch loaders.

Nothing here downloads anything. The default corpus is the text of *The Python
Language Reference* that every CPython install carries for ``help()``
(``pydoc_data.topics``, about 450 KB of English prose with some grammar and
code), so the same Python version always gives the same tokens. Where a Python
build lacks ``pydoc_data`` the docstrings of the builtins and of a fixed list
of standard-library modules stand in (a warning is logged). Any UTF-8 text
file can be used instead.

Run it::

    from stagewise.data import load_corpus

    corpus = load_corpus()                        # or load_corpus("my.txt")
    train_iter = corpus.train_batches(batch_size=16, seq_len=64, seed=0)
    inputs, labels = next(train_iter)             # (16, 64) int64 each
    val = corpus.val_batches(batch_size=16, seq_len=64, num_batches=8)

``train_iter`` is the ``data_iter`` that ``engine.train_batch(data_iter)``
pulls ``gradient_accumulation_steps`` micro-batches from. It is infinite and
driven by its own seeded generator, so the first and the last pipeline stage
(the ones that read inputs and labels) can each hold an iterator built with
the same arguments and see the same batches.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = [
    "DEFAULT_ALPHABET",
    "CharTokenizer",
    "Corpus",
    "RandomWindows",
    "TokenWindows",
    "embedded_text",
    "fixed_windows",
    "load_corpus",
    "normalize_text",
    "split_tokens",
]

logger = logging.getLogger(__name__)

#: The tokenizer's default symbols: newline, then printable ASCII (space to ``~``).
DEFAULT_ALPHABET: str = "\n" + "".join(chr(code) for code in range(32, 127))

# Characters that ASCII folding (NFKD) would lose but that have a plain spelling.
_REPLACEMENTS: dict[str, str] = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2013": "-",
    "\u2014": "--",
    "\u2026": "...",
    "\u00a0": " ",
    "\u00df": "ss",
    "\t": "    ",
    "\r\n": "\n",
    "\r": "\n",
}

# Modules whose docstrings make the fallback corpus (fixed order: deterministic).
_FALLBACK_MODULES: tuple[str, ...] = (
    "builtins",
    "collections",
    "functools",
    "itertools",
    "os",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "typing",
    "json",
    "logging",
    "argparse",
    "dataclasses",
    "inspect",
    "unittest",
    "decimal",
    "fractions",
    "statistics",
    "datetime",
)

# A line that only rules off a heading or a table ("*****", "+---+---+").
_RULE_LINE = re.compile(r"^[ \-=+*|~^#_:]+$")


def normalize_text(text: str, alphabet: str = DEFAULT_ALPHABET) -> str:
    """Map ``text`` onto ``alphabet``: plain quotes and dashes, accents folded, the rest dropped.

    Curly quotes, dashes, ellipses and tabs get ASCII spellings, accented
    letters lose their accents (NFKD), line endings become ``"\\n"``, and any
    character still outside ``alphabet`` is removed.
    """
    for old, new in _REPLACEMENTS.items():
        text = text.replace(old, new)
    allowed = set(alphabet)
    if all(char in allowed for char in text):
        return text
    folded = unicodedata.normalize("NFKD", text)
    return "".join(char for char in folded if char in allowed)


class CharTokenizer:
    """A character-level tokenizer over a fixed alphabet: token id = index in the alphabet.

    Args:
        alphabet: the symbols, each once; defaults to newline plus printable
            ASCII (96 symbols), so the vocabulary never depends on the corpus.

    >>> tok = CharTokenizer()
    >>> tok.vocab_size
    96
    >>> tok.decode(tok.encode("Hello, world!\\n"))
    'Hello, world!\\n'
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET) -> None:
        if not alphabet:
            raise ValueError("CharTokenizer needs a non-empty alphabet, got ''")
        repeated = sorted({char for char in alphabet if alphabet.count(char) > 1})
        if repeated:
            raise ValueError(
                f"CharTokenizer alphabet repeats {''.join(repeated)!r}; list each symbol once"
            )
        self.alphabet = alphabet
        self._index = {char: i for i, char in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        """The number of token ids (``len(alphabet)``)."""
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ValueError naming the first unknown character."""
        try:
            return [self._index[char] for char in text]
        except KeyError as err:
            char = err.args[0]
            raise ValueError(
                f"character {char!r} at position {text.index(char)} is not in the tokenizer's "
                f"alphabet of {self.vocab_size} symbols; pass the text through "
                "stagewise.data.normalize_text first"
            ) from None

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of token ids (a sequence or a 1-D tensor)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        try:
            return "".join(self.alphabet[i] for i in values)
        except (IndexError, TypeError):
            bad = next(v for v in values if not isinstance(v, int) or not 0 <= v < self.vocab_size)
            raise ValueError(
                f"token id {bad!r} is outside the vocabulary 0..{self.vocab_size - 1}"
            ) from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _clean_reference_text(text: str) -> str:
    """Drop the ruling lines and table rows of reST-rendered text; squeeze blank runs."""
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        stripped = line.lstrip()
        if stripped.startswith("|") or (stripped and _RULE_LINE.match(stripped)):
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def _docstring_text() -> str:
    """Docstrings of a fixed list of standard-library modules and their public members."""
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases warn when touched
        for name in _FALLBACK_MODULES:
            parts.extend(_module_docstrings(name))
    return "\n\n".join(dict.fromkeys(parts))


def _module_docstrings(name: str) -> list[str]:
    """The docstring of module ``name`` and those of its public members (longer than 80)."""
    try:
        module = importlib.import_module(name)
    except ImportError:  # pragma: no cover - a stripped-down Python
        return []
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        doc = inspect.getdoc(getattr(module, attr))
        if doc and len(doc) > 80:
            parts.append(f"{name}.{attr}\n\n{doc}")
    return [part for part in parts if part]


@functools.lru_cache(maxsize=1)
def embedded_text() -> tuple[str, str]:
    """The default corpus as ``(name, text)``, normalized to :data:`DEFAULT_ALPHABET`.

    The text of *The Python Language Reference* from ``pydoc_data.topics``
    (topics in sorted order), or, where that module is missing, standard
    library docstrings. Deterministic for a given Python version.
    """
    version = ".".join(str(part) for part in sys.version_info[:3])
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except (ImportError, AttributeError):
        logger.warning(
            "pydoc_data.topics is missing from this Python; using standard-library "
            "docstrings as the embedded corpus"
        )
        return f"Python {version} standard-library docstrings", normalize_text(_docstring_text())
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return f"The Python Language Reference (pydoc_data, Python {version})", normalize_text(
        _clean_reference_text(text)
    )


def split_tokens(
    tokens: torch.Tensor, val_fraction: float = 0.1, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token tensor into disjoint ``(train, val)`` parts, deterministically.

    The tokens are cut into chunks of ``chunk_size``; chunk ``i`` goes to
    validation when ``floor((i + 1) * val_fraction) > floor(i * val_fraction)``,
    which spreads validation evenly over the text instead of taking its tail.
    Each part is its chunks concatenated in order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if tokens.dim() != 1:
        raise ValueError(f"split_tokens needs a 1-D tensor, got shape {tuple(tokens.shape)}")
    chunks = torch.split(tokens, chunk_size)
    train: list[torch.Tensor] = []
    val: list[torch.Tensor] = []
    for i, chunk in enumerate(chunks):
        to_val = int((i + 1) * val_fraction) > int(i * val_fraction)
        (val if to_val else train).append(chunk)
    if not train or not val:
        raise ValueError(
            f"{tokens.numel()} tokens in chunks of {chunk_size} give "
            f"{len(train)} train and {len(val)} validation chunks; use a smaller chunk_size "
            "or a longer text"
        )
    return torch.cat(train), torch.cat(val)


def _check_window(tokens: torch.Tensor, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if tokens.dim() != 1:
        raise ValueError(f"{what} needs a 1-D token tensor, got shape {tuple(tokens.shape)}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"{what}: {tokens.numel()} tokens cannot hold a window of seq_len + 1 = "
            f"{seq_len + 1}; lower seq_len or use a longer text"
        )


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    offsets = torch.arange(seq_len + 1)
    return tokens[starts[:, None] + offsets]  # (B, T + 1)


class RandomWindows(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """An endless, seeded stream of ``(inputs, labels)`` micro-batches of random windows.

    Each micro-batch takes ``batch_size`` windows of ``seq_len + 1`` tokens at
    uniformly random offsets; ``inputs = window[:, :-1]`` and
    ``labels = window[:, 1:]`` (the next token at every position), both
    ``(batch_size, seq_len)`` int64.

    Data parallelism: every rank draws ``world_size * batch_size`` windows from
    the same generator and keeps its own slice, so ``world_size`` ranks with
    ``batch_size`` each see exactly the batch one rank sees with
    ``world_size * batch_size``.

    Args:
        tokens: the 1-D int64 token ids to sample from.
        batch_size: windows per micro-batch on this rank.
        seq_len: tokens per window (the model's sequence length ``T``).
        seed: seeds this iterator's own generator (the global RNG is untouched).
        rank, world_size: this rank's data-parallel index and the number of ranks.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_window(tokens, seq_len, "RandomWindows")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..world_size-1 = 0..{world_size - 1}, got {rank}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.tokens.numel() - self.seq_len  # last valid start + 1
        starts = torch.randint(high, (self.world_size * self.batch_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        window = _windows(self.tokens, mine, self.seq_len)  # (B, T + 1)
        return window[:, :-1], window[:, 1:]  # (B, T), (B, T)


def fixed_windows(
    tokens: torch.Tensor, batch_size: int, seq_len: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` fixed ``(inputs, labels)`` micro-batches spread evenly over ``tokens``.

    No randomness: the ``num_batches * batch_size`` windows start at evenly
    spaced offsets, so a validation loss on them is comparable across runs.
    Use ``iter(fixed_windows(...))`` as the ``data_iter`` of ``eval_batch``.
    """
    _check_window(tokens, seq_len, "fixed_windows")
    if batch_size < 1 or num_batches < 1:
        raise ValueError(
            f"batch_size and num_batches must be at least 1, got {batch_size} and {num_batches}"
        )
    count = batch_size * num_batches
    high = tokens.numel() - seq_len - 1  # last valid start
    starts = torch.linspace(0, high, count).round().long()
    window = _windows(tokens, starts, seq_len)  # (count, T + 1)
    inputs, labels = window[:, :-1], window[:, 1:]
    return [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, count, batch_size)
    ]


class TokenWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset of non-overlapping windows, for ``initialize(training_data=...)``.

    Item ``i`` is ``(inputs, labels)``, each ``(seq_len,)`` int64, from tokens
    ``i * seq_len`` to ``(i + 1) * seq_len`` (labels shifted by one).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        _check_window(tokens, seq_len, "TokenWindows")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"TokenWindows index {index} out of range for length {len(self)}")
        start = (index % len(self)) * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]  # (T + 1,)
        return window[:-1], window[1:]  # (T,), (T,)


@dataclass(frozen=True)
class Corpus:
    """A tokenized text with its train/validation split.

    Attributes:
        name: where the text came from.
        text: the normalized text.
        tokenizer: encodes and decodes it.
        train: 1-D int64 training token ids.
        val: 1-D int64 validation token ids, disjoint from ``train``.
    """

    name: str
    text: str
    tokenizer: CharTokenizer
    train: torch.Tensor
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the GPT's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    def train_batches(
        self, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> RandomWindows:
        """An endless seeded iterator of training micro-batches (see :class:`RandomWindows`)."""
        return RandomWindows(self.train, batch_size, seq_len, seed, rank, world_size)

    def val_batches(
        self, batch_size: int, seq_len: int, num_batches: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of validation micro-batches (see :func:`fixed_windows`)."""
        return fixed_windows(self.val, batch_size, seq_len, num_batches)


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    chunk_size: int = 1024,
    tokenizer: CharTokenizer | None = None,
) -> Corpus:
    """Load, normalize, tokenize and split a corpus.

    Args:
        path: a UTF-8 text file; ``None`` for the embedded default
            (:func:`embedded_text`).
        val_fraction: the share of chunks held out for validation.
        chunk_size: the split's chunk length in tokens (see :func:`split_tokens`).
        tokenizer: defaults to :class:`CharTokenizer` over :data:`DEFAULT_ALPHABET`.
    """
    tokenizer = tokenizer or CharTokenizer()
    if path is None:
        name, text = embedded_text()
        if tokenizer.alphabet != DEFAULT_ALPHABET:
            text = normalize_text(text, tokenizer.alphabet)
    else:
        name = os.fspath(path)
        with open(path, encoding="utf-8") as handle:
            text = normalize_text(handle.read(), tokenizer.alphabet)
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train, val = split_tokens(tokens, val_fraction, chunk_size)
    return Corpus(name=name, text=text, tokenizer=tokenizer, train=train, val=val)
