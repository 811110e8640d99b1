"""A tree of the gateway's code to measure against, for the benches that compare two trees in
one run (audience_cost.py, state_cost.py, kv_purge.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tree_of(spec: str, tmp: Path) -> Path:
    """A directory holding the tree ``spec``: itself if it is a directory, else a git revision
    of this repository, its ``gateway`` package extracted with git archive into ``tmp``."""
    if Path(spec).is_dir():
        return Path(spec)
    out = tmp / "before"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", spec, "gateway"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def before_first(text: str, path: str = "gateway/state/sqlite.py") -> str | None:
    """The parent of the first commit that added or removed ``text`` in ``path`` (git log -S):
    the tree a lever is measured against; None when no commit did."""
    found = subprocess.run(
        ["git", "-C", str(REPO), "log", "--reverse", "--format=%H", "-S", text, "--", path],
        capture_output=True, text=True, check=True).stdout.split()
    return found[0] + "^" if found else None
