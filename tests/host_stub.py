"""Stand-ins for ComfyUI's interrupt exception and progress bar, behaving like the real ones where it matters.

ComfyUI's `ProgressBar.update_absolute` clamps the value to the total and calls the server's progress hook,
which first calls `throw_exception_if_processing_interrupted()`: a Cancel raises out of the progress bar, not
only out of the node's own interrupt checks. `InterruptProcessingException` derives from BaseException in
current ComfyUI, so an `except Exception` never catches it.
"""

from __future__ import annotations

from collections.abc import Callable


class InterruptProcessingException(BaseException):
    pass


def progress_bar_class(throw_if_interrupted: Callable[[], None], record: Callable[[int, int], None]):
    """A `comfy.utils.ProgressBar` whose hook checks for Cancel, then records (value, total)."""

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.node_id = total, 0, node_id

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            throw_if_interrupted()
            record(self.current, self.total)

        def update(self, value):
            self.update_absolute(self.current + value)

    return ProgressBar
