"""A failure injected into the engine, for the batch tests: a request whose prompt holds MARKER fails
inside the engine (its forward pass raises), as a bug or a hardware fault would, while the others go on.

In-process: `monkeypatch.setattr(ModelRunner, "run", failing_run)`. In a subprocess:
`python -m tests.batch.inject batch INPUT OUTPUT ...` is `nextok batch` with the failure installed.
"""

from __future__ import annotations

import sys

from nextok.engine.runner import ModelRunner

MARKER = "BOOM"
_run = ModelRunner.run


def failing_run(self, batch):
    """ModelRunner.run, raising where the batch holds a request whose prompt holds MARKER."""
    if any(MARKER in (seq.request.prompt or "") for seq in batch.seqs):
        raise RuntimeError("injected failure")
    return _run(self, batch)


if __name__ == "__main__":
    from nextok.cli import main

    ModelRunner.run = failing_run
    sys.exit(main(sys.argv[1:]))
