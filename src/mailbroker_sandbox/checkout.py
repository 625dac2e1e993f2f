"""Where the checkout is: the sandbox reads template.yaml, events/ and functions/ from it."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    """The checkout holding template.yaml and functions/: the working directory or one above it
    (``make run``), else the checkout this package was installed from in editable mode. The
    sandbox reads the template and runs the handlers, so it needs a checkout; it says so."""
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if (folder / "template.yaml").is_file() and (folder / "functions").is_dir():
                return folder
    raise RuntimeError(
        "the sandbox runs from a mailbroker checkout: no template.yaml and functions/ in the working "
        "directory or above it; cd into the repository first"
    )
