"""Where the ``spec/`` data (transition table, conformance cases) lives.

An installed wheel carries it as ``kvpoll/spec``; a source checkout (also an
editable install) has it at the repository root. Both are found here so the
rest of kvpoll never guesses paths.
"""

from __future__ import annotations

from pathlib import Path

from kvpoll.errors import SpecError

__all__ = ["spec_dir"]


def spec_dir() -> Path:
    """Return the folder holding ``transitions.json`` and ``cases/``.

    Raises:
        SpecError: neither an installed nor a checkout copy exists.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "spec", here.parent.parent / "spec"):
        if (candidate / "transitions.json").is_file():
            return candidate
    raise SpecError(
        f"kvpoll's spec/ folder was not found next to {here}: the installation is incomplete"
    )
