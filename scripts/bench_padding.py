"""Padding share on real Alpaca lengths: plain batches vs length grouping vs packing.

Reads the 999 rows of LLaMA-Factory's `alpaca_en_demo.json` (Apache-2.0) from
`../shared/data/llama_factory/` (relative to the repository), turns them into
unified records (user = instruction, plus "\\n\\n" + input when there is one;
assistant = output), tokenizes them with a byte-level BPE trained on them
(`mmtune.data.tokenizer.build_byte_bpe_tokenizer`) through the `alpaca`
template, and batches one shuffled epoch with each `Batcher` setting.
Padding share = padding slots / all token slots of the batches.

    python scripts/bench_padding.py [--batch-size 8] [--max-length 512] [--vocab-size 8000]

Skips (exit 0, with a message) when the shared data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "llama_factory" / "alpaca_en_demo.json"


def alpaca_records(rows: list[dict]) -> list:
    from mmtune.data.schema import Record

    records = []
    for i, row in enumerate(rows):
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        records.append(Record(
            id=f"alpaca_en_demo-{i}",
            messages=[{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
            source="llama_factory/alpaca_en_demo", task="alpaca",
            meta={"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]},
        ))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca-format JSON array")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8000, help="byte-level BPE vocabulary (trained on the rows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"skip: {args.data} not found (this benchmark reads ../shared/data, which a fresh checkout lacks)")
        return 0

    from mmtune.data.batching import Batcher
    from mmtune.data.schema import write_records
    from mmtune.data.stream import ExampleStream
    from mmtune.data.tokenizer import build_byte_bpe_tokenizer, record_texts

    rows = json.loads(args.data.read_text(encoding="utf-8"))
    records = alpaca_records(rows)
    tok = build_byte_bpe_tokenizer(list(record_texts(records)), args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alpaca.jsonl"
        write_records(records, path)

        def stream() -> ExampleStream:
            return ExampleStream(str(path), tok, "alpaca", max_length=args.max_length, shuffle_buffer=len(records),
                                 seed=args.seed, epochs=1, rank=0, world_size=1)

        lengths = [len(ex) for ex, _ in stream()]
        truncated = sum(1 for ex, _ in stream() if ex.truncated_tokens)
        print(f"{args.data.name}: {len(rows)} rows -> {len(lengths)} examples; byte-level BPE of {len(tok)} tokens; "
              f"template alpaca; max_length {args.max_length}")
        print(f"tokens per example: mean {statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, "
              f"max {max(lengths)}; {truncated} truncated\n")
        settings = [
            ("plain (stream order)", dict(group_by_length=False)),
            ("length grouping, group_factor 4", dict(group_factor=4)),
            ("length grouping, group_factor 16", dict(group_factor=16)),
            ("length grouping, group_factor 64", dict(group_factor=64)),
            (f"packing into {args.max_length}-token rows, group_factor 16", dict(packing=True, group_factor=16)),
        ]
        print(f"| batch_size {args.batch_size} | batches | real tokens | token slots | padding share | examples/batch | s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, kw in settings:
            t0 = time.perf_counter()
            b = Batcher(stream(), batch_size=args.batch_size, seed=args.seed, **kw)
            for _ in b:
                pass
            st = b.stats
            print(f"| {name} | {st['batches']} | {st['tokens']} | {st['slots']} | {b.padding_share:.1%} | "
                  f"{st['examples'] / st['batches']:.1f} | {time.perf_counter() - t0:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
