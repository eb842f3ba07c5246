"""Third-party packages that only some features use, imported when such a feature runs.

A GPU machine (or a slim inference image) may carry little beyond torch, numpy, scipy and pyyaml: the model,
sampling, training loop, strategies and renderer import nothing else at import time. Audio files, resampling,
number words, phonemes, alignment, pitch and video need their package only when used, and a missing one is
one error naming the package and the feature, instead of an import failure at start-up.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> the distribution pip installs it from, where the two differ
DISTRIBUTIONS = {"monotonic_alignment_search": "monotonic-alignment-search", "imageio_ffmpeg": "imageio-ffmpeg"}


class MissingPackageError(ImportError):
    """A feature's package is not installed; the message says which and how to get it."""


def require(module: str, feature: str) -> ModuleType:
    """`import module` for `feature` (words that complete "... needs"), or MissingPackageError naming both."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = DISTRIBUTIONS.get(module.split(".")[0], module.split(".")[0])
        raise MissingPackageError(f"{feature} needs the Python package {package}, which is not installed "
                                  f"(pip install {package})") from error


def available(module: str) -> bool:
    """Whether `module` imports: for features with a fallback (phonemes fall back to letters)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
