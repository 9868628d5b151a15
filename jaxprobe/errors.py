"""Exceptions with messages that name the fix."""

from collections.abc import Sequence


def preview(items: Sequence, limit: int = 5) -> str:
    """`'a', 'b', 'c', ... (12 in all)`: enough of a list for an error message."""
    shown = ", ".join(repr(item) for item in items[:limit])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > limit else shown


class JaxprobeError(Exception):
    """Base class: every error jaxprobe raises on bad input derives from it."""


class CheckpointError(JaxprobeError):
    """A checkpoint directory, file or model id that cannot be loaded as asked."""


class SiteError(JaxprobeError, KeyError):
    """A capture site pattern that matches nothing, or a site that cannot be captured."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InputError(JaxprobeError, ValueError):
    """Bad user data: prompts, norms files, feature arrays, options."""


class StoreError(JaxprobeError, OSError):
    """Features that cannot be written or found: a full disk, a missing chunk of a multi-process run."""


class AlignmentError(InputError):
    """Features and targets that cannot be paired row for row by concept: a repeated, unmatched or missing name."""


class InterventionError(InputError):
    """An intervention that does not fit its run: a vector of the wrong width, steps outside the run, a patch
    source of the wrong shape, a CFG branch the run does not have."""
