"""`mmtune.cli.anyorder`: options and `key=value` overrides in any order after a positional argument."""

import argparse

from mmtune.cli.anyorder import add_options_and_overrides, sort_out_remainder


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", action="append", default=[])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true", default=None)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmtune x")
    parser.add_argument("target")
    add_options_and_overrides(parser, _options, overrides_help="config overrides")
    return sort_out_remainder(parser.parse_args(argv), _options, "mmtune x")


def test_options_after_the_first_override_are_read_as_options():
    args = _parse(["--records", "a.jsonl", "cfg.yaml", "x.y=1", "--k", "2", "z=3", "--records", "b.jsonl",
                   "--overwrite"])
    assert args.target == "cfg.yaml"
    assert args.overrides == ["x.y=1", "z=3"]
    assert args.k == 2 and args.overwrite is True
    assert args.records == ["a.jsonl", "b.jsonl"]  # both sides of the positional, in order


def test_options_before_the_positional_are_kept_and_defaults_do_not_overwrite_them():
    args = _parse(["--k", "7", "--out", "o", "cfg.yaml", "a=1"])
    assert (args.k, args.out, args.overwrite, args.records, args.overrides) == (7, "o", None, [], ["a=1"])
    args = _parse(["cfg.yaml"])
    assert (args.k, args.out, args.overrides) == (4, None, [])
