"""The optional dependencies of :mod:`stagewise.hf`, imported only when used.

``import stagewise`` and ``import stagewise.hf`` work without ``transformers``;
the first call that needs it raises an ImportError that says how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

INSTALL_HINT = "pip install 'stagewise[hf]'"


def require(module: str) -> ModuleType:
    """Import ``module`` (``"transformers"``, ``"safetensors.torch"``, ...) or explain the extra.

    Raises:
        ImportError: naming the missing package and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ImportError(
            f"stagewise.hf needs the {package!r} package, which is not installed ({exc}); "
            f"install the Hugging Face extra: {INSTALL_HINT}"
        ) from exc
