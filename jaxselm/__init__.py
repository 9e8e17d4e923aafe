"""jaxselm: online preference alignment (SELM) of Llama-family decoders with CoPE, in JAX/Flax."""

from jaxselm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    JaxselmError,
    JudgeError,
    TokenizerError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "JaxselmError",
    "JudgeError",
    "TokenizerError",
    "__version__",
]
