"""Corpora for ``fastlm finetune``: reading them, tokenizing them, splitting them.

* ``mlm`` reads a text file (paragraphs separated by blank lines are documents), a folder of
  text files (``.txt .md .rst .text``, and ``.jsonl``), or JSONL (one document per record, in
  the text column).  Without ``--data`` it builds the embedded default: the docstrings of the
  Python standard library, read with ``ast`` from the installation's own sources (nothing is
  imported or executed; every Python installation ships them).
* ``classify`` reads CSV/TSV (with a header row) or JSONL with a text and a label column.
  Labels are either all integer class ids or all class names (mapped in sorted order).
* ``embed`` reads pairs of texts (anchor, positive) from two columns of CSV/TSV or JSONL.
  Without ``--data``: the standard-library docstrings again, each one's summary (its first
  paragraph, or first sentence) paired with the rest of it.

Every problem with the input raises ``FinetuneError`` with a one-line message naming it.
"""
from __future__ import annotations

import ast
import csv
import json
import math
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
# Standard-library folders that are tests, GUIs, vendored or generated code: not prose.
_STDLIB_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
                "dist-packages", "ensurepip", "venv", "__pycache__", "pydoc_data"}
# Imported (not parsed) only where the standard library ships no sources (frozen / zipped
# installs): a fixed list of side-effect-free modules with rich docstrings.
_STDLIB_IMPORT_FALLBACK = ("argparse", "collections", "csv", "dataclasses", "datetime", "decimal",
                           "difflib", "email", "enum", "fractions", "functools", "heapq", "inspect",
                           "ipaddress", "itertools", "json", "logging", "math", "os", "pathlib",
                           "pickle", "random", "re", "shutil", "statistics", "string", "subprocess",
                           "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile")
MIN_DOC_WORDS = 8      # shorter docstrings ("Return self.") carry no domain signal
MIN_EXAMPLE_TOKENS = 32  # shorter neighbouring documents are packed together
MIN_SUMMARY_WORDS = 3  # docstring pairs: the summary side
EVAL_FRACTION = 0.1


class FinetuneError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


@dataclass
class Corpus:
    """Documents (and, for ``classify``, one label id per document)."""

    source: str                      # what it was read from, for the report
    texts: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None


# ----------------------------------------------------------------------------- reading
def load_corpus(task: str, data: str | None, text_column: str = "text",
                label_column: str = "label") -> Corpus:
    """The corpus for ``task`` from ``data`` (None: the embedded standard-library corpus)."""
    if data is None:
        if task != "mlm":
            raise FinetuneError("--task classify needs --data (a CSV or JSONL file with text and label columns)")
        return stdlib_corpus()
    path = Path(data)
    if not path.exists():
        raise FinetuneError(f"data not found: {data}")
    if task == "classify":
        if not path.is_file():
            raise FinetuneError(f"classify data must be one CSV, TSV or JSONL file, got a folder: {data}")
        rows = _read_records(path, (text_column, label_column))
        if not rows:
            raise FinetuneError(f"empty corpus: no text in {data}")
        texts = [text for text, _ in rows]
        labels, names = _label_ids([label for _, label in rows], label_column, path)
        return Corpus(str(path), texts, labels, names)
    files = _corpus_files(path) if path.is_dir() else [path]
    texts: list[str] = []
    for file in files:
        if file.suffix.lower() in JSONL_SUFFIXES or file.suffix.lower() in TABLE_SUFFIXES:
            texts += [text for text, in _read_records(file, (text_column,))]
        else:
            texts += _paragraphs(_read_text(file))
    if not texts:
        raise FinetuneError(f"empty corpus: no text in {data}")
    return Corpus(str(path), texts)


def load_pairs(data: str | None, anchor_column: str, positive_column: str) -> tuple[str, list[dict]]:
    """``(source, [{"anchor": ..., "positive": ...}, ...])`` from a CSV/TSV/JSONL file (None: the
    standard-library docstring pairs)."""
    if data is None:
        corpus = stdlib_corpus()
        return corpus.source.replace("docstrings", "docstrings, summary -> rest"), docstring_pairs(corpus.texts)
    path = Path(data)
    if not path.exists():
        raise FinetuneError(f"data not found: {data}")
    if not path.is_file():
        raise FinetuneError(f"embed data must be one CSV, TSV or JSONL file, got a folder: {data}")
    pairs = [{"anchor": a, "positive": p} for a, p in _read_records(path, (anchor_column, positive_column), 2)]
    if not pairs:
        raise FinetuneError(f"empty corpus: no text pairs in {data}")
    return str(path), pairs


def docstring_pairs(docstrings: list[str]) -> list[dict]:
    """Each docstring's summary (first paragraph, else first sentence) paired with the rest of it;
    docstrings with too short a side are skipped, repeated summaries kept once."""
    pairs, seen = [], set()
    for doc in docstrings:
        paragraphs = _paragraphs(doc)
        if len(paragraphs) > 1:
            summary, rest = paragraphs[0], " ".join(paragraphs[1:])
        else:
            summary, _, rest = paragraphs[0].partition(". ") if paragraphs else ("", "", "")
        if (len(summary.split()) >= MIN_SUMMARY_WORDS and len(rest.split()) >= MIN_DOC_WORDS
                and summary not in seen):
            seen.add(summary)
            pairs.append({"anchor": summary, "positive": rest})
    return pairs


def _corpus_files(folder: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise FinetuneError(f"empty corpus: no text files ({', '.join(suffixes)}) in folder {folder}")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FinetuneError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise FinetuneError(f"cannot read {path}: {exc.strerror}") from None


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised, empty ones dropped."""
    return [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _read_records(path: Path, columns: tuple[str, ...], text_columns: int = 1) -> list[tuple]:
    """``columns`` of every record of a JSONL / CSV / TSV file; the first ``text_columns`` must be
    strings, rows where one of them is empty are skipped."""
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in TABLE_SUFFIXES:
        reader = csv.DictReader(text.splitlines(), delimiter=TABLE_SUFFIXES[suffix])
        header = reader.fieldnames or []
        records = ((reader.line_num, row) for row in reader)
    elif suffix in JSONL_SUFFIXES:
        header = None
        records = _jsonl(path, text)
    else:
        raise FinetuneError(f"{path}: expected a .csv, .tsv or .jsonl file for columns {', '.join(columns)}")
    if header is not None:
        _check_columns(path, columns, header)
    out = []
    for line, record in records:
        if header is None:
            _check_columns(path, columns, list(record), line)
        values = tuple(record[c] for c in columns)
        for column, value in zip(columns[:text_columns], values):
            if not isinstance(value, str):
                raise FinetuneError(f"{path} line {line}: column {column!r} is not a string")
        if all(v.strip() for v in values[:text_columns]):
            out.append(values)
    return out


def _jsonl(path: Path, text: str):
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            raise FinetuneError(f"{path} line {line} is not valid JSON") from None
        if not isinstance(record, dict):
            raise FinetuneError(f"{path} line {line} is not a JSON object")
        yield line, record


def _check_columns(path: Path, columns, present: list[str], line: int | None = None) -> None:
    for column in columns:
        if column not in present:
            where = f"{path} line {line}" if line is not None else str(path)
            raise FinetuneError(f"unknown column {column!r} in {where} (columns: {', '.join(map(str, present)) or 'none'})")


def _label_ids(values: list, column: str, path: Path) -> tuple[list[int], list[str]]:
    """Integer class ids as given, or class names mapped to ids in sorted order.

    Mixed columns are refused: once a label is a number, every label must be a
    (non-negative, integral) number, so a stray name is reported, not silently made a class.
    """
    parsed = [_as_class_id(v) for v in values]
    numeric = [p is not None for p in parsed]
    if any(numeric):
        if not all(numeric):
            bad = next(v for v, n in zip(values, numeric) if not n)
            raise FinetuneError(f"non-numeric label {bad!r} in column {column!r} of {path} "
                                f"(other labels are numeric class ids)")
        bad = next((v for v, p in zip(values, parsed) if p < 0 or p != int(p)), None)
        if bad is not None:
            raise FinetuneError(f"label {bad!r} in column {column!r} of {path} is not a class id "
                                f"(a non-negative integer; regression is not supported)")
        ids = [int(p) for p in parsed]
        names = [str(i) for i in range(max(ids) + 1)]
    else:
        names = sorted({str(v) for v in values})
        index = {name: i for i, name in enumerate(names)}
        ids = [index[str(v)] for v in values]
    if len(set(ids)) < 2:
        raise FinetuneError(f"column {column!r} of {path} has a single class ({names[ids[0]]!r}): need at least 2")
    return ids, names


def _as_class_id(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------- default corpus
def stdlib_corpus() -> Corpus:
    """Docstrings of the running Python's standard library, in a fixed order.

    Deterministic for a given Python installation (sorted files, ``ast`` walk order).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and not d.startswith("config-"))
        files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    texts = []
    for file in files:
        try:
            tree = ast.parse(file.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                texts += _docstring(ast.get_docstring(node))
    source = f"Python {sys.version.split()[0]} standard-library docstrings ({root})"
    if not texts:   # no sources shipped: the docstrings of a fixed set of imported modules
        import importlib
        import inspect

        for name in _STDLIB_IMPORT_FALLBACK:
            module = importlib.import_module(name)
            texts += _docstring(inspect.getdoc(module))
            for _, member in sorted(vars(module).items()):
                if inspect.isclass(member) or inspect.isroutine(member):
                    texts += _docstring(inspect.getdoc(member))
        source = f"Python {sys.version.split()[0]} standard-library docstrings (imported modules)"
    return Corpus(source, texts)


def _docstring(doc: str | None) -> list[str]:
    return [doc] if doc and len(doc.split()) >= MIN_DOC_WORDS else []


# ----------------------------------------------------------------------------- examples
def mlm_examples(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Token sequences for masked-LM training, lengths between ~MIN_EXAMPLE_TOKENS and max_length.

    Documents longer than max_length are cut into near-equal pieces; consecutive short pieces
    are packed (joined by the separator token) until MIN_EXAMPLE_TOKENS.  Lengths stay mixed,
    so dynamically padded batches carry real padding (what unpadding removes).
    """
    prefix, suffix = _special_tokens_around(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 8:
        raise FinetuneError(f"--max-length {max_length} is too short (need at least {8 + max_length - body})")
    sep = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    examples, buffer = [], []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        pieces = max(1, math.ceil(len(ids) / body))
        size = math.ceil(len(ids) / pieces)
        for start in range(0, len(ids), size):
            piece = ids[start:start + size]
            if buffer and len(buffer) + len(sep) + len(piece) > body:
                examples.append(buffer)
                buffer = []
            buffer = buffer + sep + piece if buffer else piece
            if len(buffer) >= MIN_EXAMPLE_TOKENS:
                examples.append(buffer)
                buffer = []
    if buffer:
        examples.append(buffer)
    out = []
    for ids in examples:
        if len(ids) < 4:
            continue
        out.append({"input_ids": prefix + ids + suffix,   # separators between packed pieces: never masked
                    "special_tokens_mask": [1] * len(prefix) + [int(t in sep) for t in ids] + [1] * len(suffix)})
    if not out:
        raise FinetuneError("empty corpus: no usable text after tokenization")
    return out


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] / [SEP], <s> / </s>)."""
    encoded = tokenizer("a", return_special_tokens_mask=True)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    first = special.index(0) if 0 in special else len(ids)
    last = len(special) - special[::-1].index(0) if 0 in special else len(ids)
    return ids[:first], ids[last:]


def classify_examples(corpus: Corpus, tokenizer, max_length: int) -> list[dict]:
    """One truncated example per document, with its label id."""
    encoded = tokenizer(corpus.texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    return [{**{k: encoded[k][i] for k in keys}, "labels": label} for i, label in enumerate(corpus.labels)]


def split(examples: list[dict], seed: int, max_eval: int) -> tuple[list[dict], list[dict]]:
    """Deterministic (seeded) shuffle, then EVAL_FRACTION (at most ``max_eval``, at least 1) for eval."""
    if len(examples) < 2:
        raise FinetuneError(f"corpus too small: {len(examples)} example(s), need at least 2 (train and eval)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, min(max_eval, round(len(examples) * EVAL_FRACTION)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
