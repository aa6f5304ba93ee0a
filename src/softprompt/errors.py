"""The one exception softprompt raises for a user to act on."""

from __future__ import annotations


class SoftPromptError(ValueError):
    """A user-facing error: the message says what was wrong, where, and what to do.

    The CLI prints it as one ``error: ...`` line and exits with status 2; the server answers it
    with a 4xx OpenAI-shaped error body.
    """


_PACKAGES = {
    "sklearn": "scikit-learn",
    "rouge_score": "rouge-score",
    "lm_eval": "lm-eval",
}  # module -> pip name


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or say which extra installs it.

    Args:
        module: the module to import (e.g. ``"fastapi"``).
        extra: softprompt's extra that brings it (``pip install 'softprompt[serve]'``).
        what: what needs it, for the message ("softprompt serve").

    Raises:
        SoftPromptError: the package is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = _PACKAGES.get(module.split(".")[0], module.split(".")[0])
        raise SoftPromptError(
            f"{what} needs the {package} package, which is not installed: "
            f"pip install 'softprompt[{extra}]' (or 'softprompt[all]')"
        ) from e
