"""The commit a benchmark ran on, for its header line: the short hash when the checkout's files are
exactly that commit's; otherwise "<HEAD> + uncommitted changes (tree <hash>)", where the hash names
the files as they are (tracked and not ignored). A copied tree whose .git is older than its files
(the GPU machines' copies) shows as such; `git log --all --format='%h %t' | grep <hash>` finds the
commit whose files it ran."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, root: Path, env: dict | None = None) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)
        return done.stdout.strip()
    except OSError:  # no git on this machine
        return ""


def _files_tree(root: Path) -> str:
    """The git tree hash of the working files, from a scratch index and a scratch object store that
    borrows the repository's (which is left as it was)."""
    git_dir = _git("rev-parse", "--absolute-git-dir", root=root)
    if not git_dir:
        return ""
    with tempfile.TemporaryDirectory() as scratch:
        objects = os.path.join(scratch, "objects")
        os.mkdir(objects)
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(scratch, "index"), GIT_OBJECT_DIRECTORY=objects,
                   GIT_ALTERNATE_OBJECT_DIRECTORIES=os.path.join(git_dir, "objects"))
        _git("add", "-A", ".", root=root, env=env)
        return _git("write-tree", root=root, env=env)


def tree_commit(root: Path = ROOT) -> str:
    head = _git("rev-parse", "--short", "HEAD", root=root) or "unknown"
    files = _files_tree(root)
    if files and files == _git("rev-parse", "HEAD^{tree}", root=root):
        return head
    return f"{head} + uncommitted changes" + (f" (tree {files[:7]})" if files else "")
