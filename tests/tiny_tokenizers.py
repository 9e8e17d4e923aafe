"""A small byte-level BPE tokenizer trained on the spot, for tokenizer and export tests."""

from __future__ import annotations

import json
from pathlib import Path


def train_bpe_dir(folder: Path, corpus: list[str], vocab_size: int, config: dict) -> Path:
    """``folder`` with a byte-level BPE ``tokenizer.json`` (GPT-2 pre-tokenizer; specials
    <s>, </s>, <pad>) trained on ``corpus``, and ``tokenizer_config.json`` = ``config``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def train_sentencepiece(folder: Path, corpus: list[str], prefix: str, **options) -> Path:
    """A SentencePiece BPE model (vocabulary 400, byte fallback, no normalisation) trained on
    ``corpus``: ``folder/<prefix>.model``."""
    import sentencepiece as spm

    text = folder / f"{prefix}.corpus.txt"
    text.write_text("\n".join(corpus), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / prefix),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        minloglevel=2,
        **options,
    )
    text.unlink()
    return folder / f"{prefix}.model"
