"""Data preparation speed: rows/s of `sft.prepare` (what `python -m jaxrl_llm.train` does before its first step)
against the approach TRL takes (HF `datasets.map` over the rows with the tokenizer's `apply_chat_template`), on
the same synthetic chat rows and the SmolLM2 tokenizer; and `sft.pack` (data.packing) on many examples.

    python benchmarks/data_prep.py                       # 5000 rows, packing of 100k and 1M examples
    python benchmarks/data_prep.py --rows 20000 --pack 0

The rows: 1-3 user/assistant turns of 20-150 random words each (about 0.9 KB a row, as the review that asked
for this used). TRL's path is timed as SFTTrainer's tokenization runs it: one `map` call per row computing
`apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=False)` (its assistant-only loss needs
a template with {% generation %} blocks, which SmolLM2's lacks); ours also builds the assistant-only loss mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or have had "
         "not but one all their there been has when who will more no if out so said what up its about into than "
         "them can only other new some could time these two may then do first any my now such like our over man "
         "me even most made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three 17 42 3.5 x y = + -").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(int(rng.integers(1, 4))):
            msgs += [{"role": "user", "content": text(20, 80)}, {"role": "assistant", "content": text(30, 150)}]
        rows.append({"messages": msgs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--pack", default="100000,1000000", help="example counts for sft.pack; 0: skip")
    ap.add_argument("--no-hf", action="store_true", help="skip the datasets.map row")
    args = ap.parse_args()

    from jaxrl_llm.algorithms import sft
    from jaxrl_llm.models.gguf_io import smollm2_gguf_path
    from jaxrl_llm.run_tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf_path())
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, "
          f"tokenizer {type(tok).__name__}")
    rows = make_rows(args.rows)
    table = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        mb = os.path.getsize(path) / 2**20
        cfg = ml_collections.ConfigDict({"data": dict(
            source=path, num_examples=-1, max_len=4096, overlong="truncate", chat_template="",
            chat_template_kwargs="", add_eos=True, last_assistant_only=False, packing=False)})
        t = time.perf_counter()
        out, _ = sft.prepare(cfg, tok)
        ours = time.perf_counter() - t
        tokens = sum(len(ids) for ids, _ in out)
        table.append(("jaxrl_llm sft.prepare (file read, fields, template, tokens, loss mask)", ours))
        from jaxrl_llm.data.cache import DataCache

        cache = DataCache(os.path.join(d, "data_cache"))
        sft.prepare(cfg, tok, cache=cache)
        t = time.perf_counter()
        cache.flush()
        table.append(("jaxrl_llm: writing the tokens to WORKDIR/data_cache (first start, after the above)",
                      time.perf_counter() - t))
        t = time.perf_counter()
        again, _ = sft.prepare(cfg, tok, cache=DataCache(cache.folder))
        table.append(("jaxrl_llm sft.prepare on a resumed start (tokens read from data_cache)",
                      time.perf_counter() - t))
        assert sum(len(ids) for ids, _ in again) == tokens
        if not args.no_hf:
            import datasets

            datasets.disable_caching()
            datasets.disable_progress_bars()

            def hf_row(r):
                ids = tok.apply_chat_template(r["messages"], tokenize=True)
                return {"input_ids": ids["input_ids"] if hasattr(ids, "keys") else ids}

            t = time.perf_counter()
            ds = datasets.load_dataset("json", data_files=path, split="train")
            ds = ds.map(hf_row, remove_columns=ds.column_names)
            hf = time.perf_counter() - t
            hf_tokens = sum(len(x) for x in ds["input_ids"])
            table.append(("HF datasets.map + apply_chat_template (TRL's path, no loss mask)", hf))
    print(f"\n{args.rows} rows ({mb:.1f} MB of JSON Lines, {tokens} tokens by ours"
          + ("" if args.no_hf else f", {hf_tokens} by HF's") + ")\n")
    print("| path | seconds | rows/s | seconds / the first row's |")
    print("|---|---|---|---|")
    for name, s in table:
        print(f"| {name} | {s:.2f} | {args.rows / s:.0f} | {s / ours:.2f}x |")

    counts = [int(c) for c in args.pack.split(",") if int(c) > 0]
    if counts:
        print("\n| sft.pack: examples (50-400 tokens) into rows of 2048 | seconds | rows made |")
        print("|---|---|---|")
        rng = np.random.default_rng(0)
        for n in counts:
            ex = [(np.zeros(int(k), np.int32), None) for k in rng.integers(50, 400, n)]
            t = time.perf_counter()
            packed = sft.pack(ex, 2048)
            print(f"| {n} | {time.perf_counter() - t:.2f} | {len(packed)} |")


if __name__ == "__main__":
    main()
