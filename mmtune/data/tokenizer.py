"""Tokenizers: a pretrained one from a folder/hub id, or one built with no download.

Users point `model.tokenizer.name_or_path` at their LM's tokenizer. Tiny test
and demo models instead get a byte-level BPE trained on the spot with the
`tokenizers` library (or, with a vocab of 256 + specials, plain bytes), so
nothing is fetched from a hub. Either way the tokenizer comes back with a pad
token and the `<image>` placeholder as a single special token.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmtune.config import TokenizerConfig
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.errors import MMTuneError

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
# Turn markers of the chatml template: single tokens, so an answer ends in one
# trained token and generation can stop on it.
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")


def build_byte_bpe_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 260,
    extra_special_tokens: Iterable[str] = (),
) -> Any:
    """A `PreTrainedTokenizerFast` over bytes, with BPE merges learned from `texts`.

    vocab_size counts the 256 byte symbols, the specials and the merges; with no
    texts (or a vocab too small for merges) it is a plain byte tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra_special_tokens = [*TEMPLATE_TOKENS, *extra_special_tokens]
    specials = [*SPECIAL_TOKENS.values(), IMAGE_PLACEHOLDER, *extra_special_tokens]
    specials = list(dict.fromkeys(specials))
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False keeps "a b" and "a" + " b" tokenizing the same way,
    # which lets labels follow character spans exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(byte_alphabet) + len(specials)),
        special_tokens=specials,
        initial_alphabet=byte_alphabet,
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(list(texts or []) or [""], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=[IMAGE_PLACEHOLDER, *[t for t in extra_special_tokens if t != IMAGE_PLACEHOLDER]],
        **SPECIAL_TOKENS,
    )
    fast.model_max_length = 1 << 30
    return fast


def record_texts(records: Iterable[Record]) -> Iterator[str]:
    """Every message content of every record (the corpus a tokenizer is trained on)."""
    for rec in records:
        for m in rec.messages:
            yield m["content"].replace(IMAGE_PLACEHOLDER, " ")


def load_tokenizer(name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The one way mmtune loads a saved / pretrained tokenizer; a failure is one line naming the source."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MMTuneError(f"{os.fspath(name_or_path)}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None


def build_tokenizer(cfg: TokenizerConfig, corpus: Iterable[str] | None = None) -> Any:
    """The tokenizer a config asks for, made ready for mmtune (pad token, `<image>` token)."""
    if cfg.name_or_path:
        return prepare_tokenizer(load_tokenizer(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code))
    if cfg.train_vocab_size:
        texts: list[str] = list(corpus or [])
        for path in cfg.train_files:
            from mmtune.data.schema import read_records

            texts.extend(record_texts(read_records(path)))
        return build_byte_bpe_tokenizer(texts, cfg.train_vocab_size)
    raise MMTuneError("model.tokenizer needs name_or_path (a tokenizer folder or hub id) or train_vocab_size")


def prepare_tokenizer(tok: Any) -> Any:
    """Give a pretrained tokenizer what training needs: a pad token and a single `<image>` token."""
    if IMAGE_PLACEHOLDER not in tok.all_special_tokens:  # absent, or a plain token split by pre-tokenizers
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def save_tokenizer(tok: Any, folder: str | Path) -> None:
    tok.save_pretrained(str(folder))
