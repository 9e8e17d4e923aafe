"""jaxselm parameter pytrees -> GGUF llama files (F32 / F16 / BF16) that llama.cpp and ollama load.

The tensor names, the q/k row permutation and the metadata keys are :mod:`jaxselm.hf.gguf`'s
(import); this is the other way. Matrices are written in the requested dtype, vectors (norms,
Llama-3's ``rope_freqs``) in float32, as llama.cpp's convert script does; a tokenizer's
``tokenizer.ggml.*`` metadata goes with them, so llama.cpp / ollama tokenize and template chats as
the policy was trained.

    from jaxselm.hf import gguf_tokenizer, load_gguf_checkpoint, save_gguf_checkpoint
    cfg, params = load_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    save_gguf_checkpoint(cfg, params, "out/policy.f16.gguf", dtype="float16", tokenizer=tok)

What a GGUF llama cannot express (CoPE or learned absolute positions, a sliding window, a reward
head) is refused with a one-line ConfigError.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxselm.data.tokenizer import HFTokenizer, SentencePieceTokenizer
from jaxselm.data.tokenizer_base import Tokenizer
from jaxselm.data.tokenizer_gguf import UNUSED, GGUFVocab
from jaxselm.errors import CheckpointError, ConfigError, TokenizerError
from jaxselm.files import atomic_write
from jaxselm.hf.gguf import ROPE_FREQS, gguf_name, permute_rows, permuted_heads
from jaxselm.hf.layout import NP_DTYPES, TensorSpec, param_leaves, tensor_layout
from jaxselm.model.config import ModelConfig
from jaxselm.model.rope import inverse_frequencies
from jaxselm.parallel.multihost import any_process, is_primary, to_host

#: parameter dtype of an export -> llama.cpp's general.file_type (LlamaFileType).
FILE_TYPES = {"float32": 0, "float16": 1, "bfloat16": 32}


def _check_exportable(config: ModelConfig, params: Mapping) -> None:
    """One-line ConfigError for what a GGUF llama cannot express."""
    if config.position != "rope":
        raise ConfigError(
            f"model.position: GGUF llama needs 'rope' (got {config.position!r}: CoPE and learned "
            "absolute positions have no llama.cpp form)"
        )
    if config.sliding_window is not None:
        raise ConfigError(
            f"model.sliding_window: GGUF llama has no sliding window (got {config.sliding_window})"
        )
    if isinstance(params, Mapping) and "score" in params:
        raise ConfigError("params: a reward head (score) cannot be written as a GGUF llama")


def _rope_freqs(config: ModelConfig) -> np.ndarray:
    """convert_hf_to_gguf.py's Llama-3 ``rope_freqs``: the divisor of each base frequency."""
    sc = config.rope_scaling
    inv = inverse_frequencies(config.replace(rope_scaling=None))
    wavelen = 2 * math.pi / inv.astype(np.float64)
    old = sc.original_max_position_embeddings
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    out = np.where(
        wavelen > old / sc.low_freq_factor, sc.factor, 1 / ((1 - smooth) / sc.factor + smooth)
    )
    return np.where(wavelen < old / sc.high_freq_factor, 1.0, out).astype(np.float32)


def _tokenizer_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    if not isinstance(tokenizer, (HFTokenizer, SentencePieceTokenizer)):
        raise TokenizerError(
            f"{tokenizer.source}: only tokenizer.json, SentencePiece and GGUF tokenizers can be "
            "written to a GGUF file"
        )
    vocab = tokenizer.gguf_vocab()
    if len(vocab.tokens) > vocab_size:
        raise ConfigError(
            f"tokenizer: {tokenizer.source} has {len(vocab.tokens)} tokens, more than the "
            f"model's vocab_size {vocab_size}"
        )
    return vocab


def _add_tokenizer(w: Any, vocab: GGUFVocab, vocab_size: int) -> None:
    """``tokenizer.ggml.*``, padded to ``vocab_size`` with unused tokens as llama.cpp's convert
    script does (llama.cpp wants one token per embedding row)."""
    pad = range(len(vocab.tokens), vocab_size)
    w.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":
        w.add_tokenizer_pre(vocab.pre or "default")
    w.add_token_list([*vocab.tokens, *(f"[PAD{i}]" for i in pad)])
    w.add_token_types([*vocab.token_types, *(UNUSED for _ in pad)])
    if vocab.scores is not None:
        w.add_token_scores([*vocab.scores, *(-1000.0 for _ in pad)])
    if vocab.merges is not None:
        w.add_token_merges(list(vocab.merges))
    for tid, add in (
        (vocab.bos_id, w.add_bos_token_id),
        (vocab.eos_id, w.add_eos_token_id),
        (vocab.unk_id, w.add_unk_token_id),
        (vocab.pad_id, w.add_pad_token_id),
    ):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


def _add_model(w: Any, config: ModelConfig, dtype: str, name: str) -> None:
    import gguf

    e, h, d = config.hidden_size, config.num_heads, config.resolved_head_dim
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(e)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(h)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if e % h or d != e // h:
        w.add_key_length(d)
        w.add_value_length(d)
    sc = config.rope_scaling
    if sc is not None and sc.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(sc.factor)
    w.add_file_type(FILE_TYPES[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(
    config: ModelConfig, params: Mapping, dtype: str
) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(GGUF name, shape, dtype, producer) of every tensor, in the order they are written.

    Matrices are written in ``dtype``, vectors (norms, rope_freqs) in float32 as llama.cpp wants.
    """
    out = []
    specs = tensor_layout(config, "lm")
    leaves = param_leaves(params, specs)

    def producer(spec: TensorSpec, layer: int | None, np_dtype: np.dtype) -> Callable:
        def produce() -> np.ndarray:
            part = leaves[spec.path] if layer is None else leaves[spec.path][layer]
            w = spec.to_hf(np.asarray(to_host(part), np.float32))
            n = permuted_heads(spec, config)
            return np.ascontiguousarray((permute_rows(w, n) if n else w).astype(np_dtype))

        return produce

    ordered = [(s, None) for s in specs if not s.stacked and s.path == ("embed",)]
    ordered += [(s, i) for i in range(config.num_layers) for s in specs if s.stacked]
    ordered += [(s, None) for s in specs if not s.stacked and s.path != ("embed",)]
    for spec, layer in ordered:
        np_dtype = NP_DTYPES[dtype] if len(spec.hf_shape) > 1 else np.dtype(np.float32)
        name = gguf_name(spec, layer or 0)
        out.append((name, spec.hf_shape, np_dtype, producer(spec, layer, np_dtype)))
    sc = config.rope_scaling
    if sc is not None and sc.rope_type == "llama3":
        freqs = _rope_freqs(config)
        out.append((ROPE_FREQS, freqs.shape, freqs.dtype, lambda: freqs))
    return out


def _write(
    tmp: str,
    config: ModelConfig,
    dtype: str,
    name: str,
    vocab: GGUFVocab | None,
    tensors: list,
    produce: Callable[[int], np.ndarray],
) -> None:
    import gguf

    w = gguf.GGUFWriter(tmp, "llama")
    _add_model(w, config, dtype, name)
    if vocab is not None:
        _add_tokenizer(w, vocab, config.vocab_size)
    for tname, shape, np_dtype, _ in tensors:
        nbytes = math.prod(shape) * np_dtype.itemsize
        raw = gguf.GGMLQuantizationType.BF16 if np_dtype == NP_DTYPES["bfloat16"] else None
        w.add_tensor_info(tname, shape, np.dtype(np.uint16) if raw else np_dtype, nbytes, raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (_, _, np_dtype, _) in enumerate(tensors):  # one tensor in host memory at a time
            arr = produce(i)
            w.write_tensor_data(arr.view(np.uint16) if np_dtype == NP_DTYPES["bfloat16"] else arr)
    finally:
        w.close()


def save_gguf_checkpoint(
    config: ModelConfig,
    params: Mapping,
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    tokenizer: Tokenizer | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as one GGUF llama file that llama.cpp / ollama load.

    dtype: "float32" | "float16" | "bfloat16", the matrices' type (norms stay float32).
    tokenizer: its ``tokenizer.ggml.*`` metadata (model, tokens, types, merges or scores, special
        ids, add_bos, chat template) is written too; a tokenizer.json, SentencePiece or GGUF one.
    The file is written under a temporary name beside ``path`` and renamed: nothing half-written
    is left. An existing ``path`` is replaced only with ``overwrite=True``. In a multi-process run
    every process calls this with the same arguments (tensors sharded across hosts are gathered
    one at a time) and process 0 writes.
    """
    dest = Path(path)
    try:
        import gguf  # noqa: F401 - llama.cpp's writer, needed below
    except ImportError:
        raise CheckpointError(
            f"{dest}: writing GGUF files needs the 'gguf' package (pip install gguf)"
        ) from None
    _check_exportable(config, params)
    if dtype not in FILE_TYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(FILE_TYPES)} (got {dtype!r})")
    if dest.is_dir():
        raise CheckpointError(f"{dest}: is a directory; expected a .gguf file path")
    if dest.exists() and not overwrite:
        raise CheckpointError(f"{dest}: exists (pass overwrite=True to replace it)")
    vocab = None if tokenizer is None else _tokenizer_vocab(tokenizer, config.vocab_size)
    tensors = _tensors(config, params, dtype)
    done: list[int] = []

    def produce(i: int) -> np.ndarray:
        done.append(i)
        return tensors[i][3]()

    def write(tmp: str) -> None:
        _write(tmp, config, dtype, dest.stem, vocab, tensors, produce)

    if jax.process_count() == 1:
        atomic_write(dest, write)
        return dest
    failed: BaseException | None = None
    if is_primary():
        try:
            atomic_write(dest, write)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
            failed = err
    for i in range(len(done), len(tensors)):  # every process gathers every tensor, in order
        tensors[i][3]()
    if any_process(failed is not None):
        if failed is not None:
            raise failed
        raise CheckpointError(
            f"{dest}: writing the GGUF file failed on process 0 (its error says why)"
        )
    return dest
