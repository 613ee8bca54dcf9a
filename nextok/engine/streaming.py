"""Streaming: how much of a sequence's text may be sent while it is still generating.

One rule for every streamer (LLM.stream, the server): text that a stop string could still cut is
held back until the next tokens show whether it does; a finished sequence releases all of it.
"""

from __future__ import annotations

from nextok.engine.sequence import Sequence


def releasable_end(seq: Sequence, sent: int) -> int:
    """The end of seq.text that may be sent now, given `sent` characters sent already (never less)."""
    if seq.finish_reason is not None:
        return len(seq.text)
    holdback = max((len(s) for s in seq.params.stop), default=1) - 1  # a stop string may still cut this
    return max(sent, len(seq.text) - holdback)
