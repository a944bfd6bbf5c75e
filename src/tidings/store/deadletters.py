"""Errors of the dead-letter records that every backend shares."""

from __future__ import annotations

from tidings.errors import TidingsError

__all__ = ["DeadLetterNotFound"]


class DeadLetterNotFound(TidingsError):
    """A dead letter to be removed with a subscription step's commit was gone: another retry
    of it (or a discard) committed first. The step was rolled back, so a retried dead letter is
    applied exactly once however many retries race. Permanent: the entry no longer exists."""

    permanent = True

    def __init__(self, group: str, id: int) -> None:
        super().__init__(
            f"dead letter {id} of subscription group {group!r} is gone (retried or discarded "
            "concurrently); nothing was committed"
        )
        self.group = group
        self.id = id
