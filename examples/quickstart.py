"""Quickstart: build a tiny CoPE model, run a forward pass, decode a few tokens with the KV cache.

python examples/quickstart.py
"""

import jax
import jax.numpy as jnp

from jaxselm.model import apply_with_cache, forward, get_preset, init_cache, init_params


def main() -> None:
    cfg = get_preset("tiny-cope")
    params = init_params(cfg, jax.random.key(0))
    print(
        f"model: {cfg.num_layers} layers, {cfg.hidden_size} hidden, position={cfg.position}, "
        f"{cfg.num_params():,} params"
    )

    tokens = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])  # first row left-padded
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    logits = forward(params, cfg, tokens, mask)
    print("logits", logits.shape, logits.dtype)

    cache = init_cache(cfg, batch=2, max_len=16)
    logits, cache = apply_with_cache(params, cfg, tokens, mask, cache)
    out = []
    for _ in range(5):
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        out.append(nxt)
        logits, cache = apply_with_cache(params, cfg, nxt[:, None], None, cache)
    print("greedy continuation", jnp.stack(out, 1).tolist())


if __name__ == "__main__":
    main()
