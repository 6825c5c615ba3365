"""Every user-facing error type, in one place (the CLI turns each into a one-line message, exit 2).

Each message names the problem and the fix. Modules raise these; none of them imports a model.
"""

from __future__ import annotations


class MechiclError(Exception):
    """Base class: a mistake or missing resource the user can fix."""


class TaskError(MechiclError, ValueError):
    """A task name or file that cannot be turned into a task."""


class PromptError(MechiclError, ValueError):
    """Base class for prompt-construction errors."""


class LabelTokenError(PromptError):
    """A label word is not exactly one token in its template context."""


class ContextOverflowError(PromptError):
    """A context is longer than the model's n_ctx."""


class PairError(PromptError):
    """A clean/corrupted pair whose runs differ in more than their label tokens."""


class ResourceUnavailable(MechiclError, RuntimeError):
    """A model or data file could not be had (offline, missing, corrupt)."""


class UnknownModel(MechiclError, ValueError):
    """The model name is neither registered, a local path, nor a Hub id."""


class ModelUnavailable(ResourceUnavailable):
    """The model exists in principle but its weights cannot be had offline."""


class ConfigError(MechiclError, ValueError):
    """A malformed experiment config or command-line value."""


class OutputError(MechiclError, OSError):
    """A run folder that cannot be written: ``--out`` is a file, unwritable, in use, or under /proc."""


USER_ERRORS = (MechiclError,)
