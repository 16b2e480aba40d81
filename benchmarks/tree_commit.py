"""The commit a benchmark ran on, for its header line: the short hash when the checkout's files are
exactly that commit's; otherwise "<HEAD> + uncommitted changes (tree <hash>)", where the hash names
the files as they are (tracked and not ignored). A copied tree whose .git is older than its files
(the GPU machines' copies) shows as such; `git log --all --format='%h %t' | grep <hash>` finds the
commit whose files it ran. Files outside a checkout of their own (a `git archive` of another commit
unpacked to run beside this one) read "no commit (tree <hash>)"."""
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


def _files_tree(root: Path, in_checkout: bool) -> str:
    """The git tree hash of the working files, from a scratch index and a scratch object store: one
    borrowing the repository's objects where root is a checkout's top (the repository is left as it
    was), else a scratch repository made for root (root's .gitignore still applies)."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(scratch, "index"))
        if in_checkout:
            objects = os.path.join(scratch, "objects")
            os.mkdir(objects)
            git_dir = _git("rev-parse", "--absolute-git-dir", root=root)
            env.update(GIT_OBJECT_DIRECTORY=objects,
                       GIT_ALTERNATE_OBJECT_DIRECTORIES=os.path.join(git_dir, "objects"))
        else:
            _git("init", "-q", scratch, root=root)
            env.update(GIT_DIR=os.path.join(scratch, ".git"), GIT_WORK_TREE=str(root))
        _git("add", "-A", ".", root=root, env=env)
        return _git("write-tree", root=root, env=env)


def tree_commit(root: Path = ROOT) -> str:
    top = _git("rev-parse", "--show-toplevel", root=root)
    if not top or Path(top).resolve() != root.resolve():
        files = _files_tree(root, in_checkout=False)
        return f"no commit (tree {files[:7]})" if files else "unknown"
    head = _git("rev-parse", "--short", "HEAD", root=root) or "unknown"
    files = _files_tree(root, in_checkout=True)
    if files and files == _git("rev-parse", "HEAD^{tree}", root=root):
        return head
    return f"{head} + uncommitted changes" + (f" (tree {files[:7]})" if files else "")
