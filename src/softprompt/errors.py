"""The one exception softprompt raises for a user to act on."""

from __future__ import annotations


class SoftPromptError(ValueError):
    """A user-facing error: the message says what was wrong, where, and what to do.

    The CLI prints it as one ``error: ...`` line and exits with status 2; the server answers it
    with a 4xx OpenAI-shaped error body.
    """
