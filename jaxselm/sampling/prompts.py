"""The prompts of :func:`jaxselm.sampling.generate`: any accepted form -> checked [B, T] arrays.

Prompts come as token-id lists (left-padded here by :func:`jaxselm.data.packing.pack_prompts`),
a ``PromptBatch``, a left-padded int array with its mask, or -- in a multi-process run -- a
global batch spanning other hosts' devices, of which each process checks the rows it holds.
Every problem is a one-line DataError naming the (global) row, or a ConfigError for a
``max_new_tokens`` the model's context cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.data.packing import PromptBatch, pack_prompts
from jaxselm.errors import ConfigError, DataError
from jaxselm.model import ModelConfig


def row_blocks(arr: jax.Array) -> list[tuple[int, np.ndarray]]:
    """(first global row, host copy) of each distinct block of rows this process holds."""
    seen: dict[int, np.ndarray] = {}
    for shard in arr.addressable_shards:
        start = shard.index[0].start or 0
        if start not in seen:
            seen[start] = np.asarray(shard.data)
    return sorted(seen.items())


def shift_row(message: str, offset: int) -> str:
    """'prompts[i]: ...' of a block starting at row ``offset`` -> the global row."""
    head, sep, rest = message.partition("]")
    if sep and head.startswith("prompts[") and head[8:].isdigit():
        return f"prompts[{int(head[8:]) + offset}]{rest}"
    return message


def validate_prompts(
    tokens: np.ndarray, mask: np.ndarray, config: ModelConfig, max_new_tokens: int
) -> None:
    b = tokens.shape[0]
    lens = mask.sum(axis=1)
    for i in range(b):
        if lens[i] == 0:
            raise DataError(f"prompts[{i}]: empty prompt (needs at least one token)")
    not_left = np.nonzero((mask[:, 1:] < mask[:, :-1]).any(axis=1))[0]
    if len(not_left):
        raise DataError(
            f"prompts[{not_left[0]}]: prompt_mask is not left-padded "
            "(padding must precede the tokens)"
        )
    bad = np.nonzero(((tokens < 0) | (tokens >= config.vocab_size)) & mask)
    if len(bad[0]):
        i, j = int(bad[0][0]), int(bad[1][0])
        raise DataError(
            f"prompts[{i}]: token id {int(tokens[i, j])} at position {j} is outside the "
            f"vocabulary [0, {config.vocab_size})"
        )
    ctx = config.max_position_embeddings
    longest = int(lens.max())
    too_long = np.nonzero(lens > ctx)[0]
    if len(too_long):
        i = int(too_long[0])
        raise DataError(
            f"prompts[{i}]: {int(lens[i])} tokens exceed the model context "
            f"max_position_embeddings={ctx}"
        )
    if longest + max_new_tokens > ctx:
        raise ConfigError(
            f"max_new_tokens: {max_new_tokens} + longest prompt {longest} tokens exceeds the "
            f"model context max_position_embeddings={ctx}"
        )


def prompt_arrays(
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | PromptBatch | jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray | None,
    *,
    max_new_tokens: int,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Checked, left-padded prompts ``tokens [B, T] int32`` (0 in padding slots, what the model
    sees there) and ``mask [B, T] bool``."""
    if isinstance(prompts, PromptBatch):
        if prompt_mask is not None:
            raise DataError("prompt_mask: a PromptBatch carries its own mask")
        prompts, prompt_mask = prompts.tokens, prompts.mask

    if isinstance(prompts, jax.Array) and not prompts.is_fully_addressable:
        # A global batch spanning other hosts (multi-process): each process checks the rows it
        # holds, and the arrays stay where they are.
        tok_arr, mask_arr = prompts, prompt_mask
        if tok_arr.ndim != 2 or not jnp.issubdtype(tok_arr.dtype, jnp.integer):
            raise DataError(
                f"prompts: expected an int array [B, T], got {tok_arr.dtype} {tok_arr.shape}"
            )
        if not isinstance(mask_arr, jax.Array) or mask_arr.shape != tok_arr.shape:
            raise DataError(
                f"prompt_mask: a global batch of prompts needs a global mask shaped {tok_arr.shape}"
            )
        for t_shard, m_shard in zip(row_blocks(tok_arr), row_blocks(mask_arr)):
            try:
                validate_prompts(t_shard[1], m_shard[1].astype(bool), config, max_new_tokens)
            except DataError as err:  # name the global row
                raise DataError(shift_row(str(err), t_shard[0])) from None
        tok_arr = jnp.where(mask_arr.astype(bool), tok_arr, 0).astype(jnp.int32)
        mask_arr = mask_arr.astype(bool)
    elif isinstance(prompts, (jax.Array, np.ndarray)):
        tokens = np.asarray(prompts)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(
                f"prompts: expected an int array [B, T], got {tokens.dtype} {tokens.shape}"
            )
        if prompt_mask is None:
            mask = np.ones(tokens.shape, bool)
        else:
            mask = np.asarray(prompt_mask).astype(bool)
        if mask.shape != tokens.shape:
            raise DataError(f"prompt_mask: shape {mask.shape} differs from prompts {tokens.shape}")
        tokens = tokens.astype(np.int32)
    else:
        if prompt_mask is not None:
            raise DataError("prompt_mask: only allowed with an array of prompts, not id lists")
        packed = pack_prompts(prompts, pad_id)
        tokens, mask = packed.tokens, packed.mask
    if not isinstance(prompts, jax.Array) or prompts.is_fully_addressable:
        validate_prompts(tokens, mask, config, max_new_tokens)
        tokens = np.where(mask, tokens, 0).astype(np.int32)  # the model sees id 0 in padding slots
        tok_arr, mask_arr = jnp.asarray(tokens), jnp.asarray(mask)
    return tok_arr, mask_arr
