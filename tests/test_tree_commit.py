"""benchmarks/tree_commit.py labels results with the commit whose files ran: the bare hash when the
files are that commit's, else a tree hash that names the files as they were (a stale .git included)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tree_commit.py"


def tree_commit(root: Path) -> str:
    spec = importlib.util.spec_from_file_location("tree_commit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tree_commit(root)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def first_files(root: Path, ignore: str) -> None:
    """The files of a test repository's first commit: a .gitignore and one source file."""
    (root / ".gitignore").write_text(ignore)
    (root / "a.py").write_text("x = 1\n")


def first_commit(root: Path, ignore: str) -> str:
    """A new repository at root holding `first_files`, committed; the commit's short hash."""
    git(root, "init", "-q")
    first_files(root, ignore)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "one")
    return git(root, "rev-parse", "--short", "HEAD")


def test_labels_name_the_files_that_ran(tmp_path):
    first = first_commit(tmp_path, "/scratch/\n")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "log.txt").write_text("ignored files change nothing\n")
    assert tree_commit(tmp_path) == first

    # a newer commit's files under the old .git: a changed file and a new one, as a copy brings them
    objects = git(tmp_path, "count-objects")
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "b.py").write_text("y = 3\n")
    label = tree_commit(tmp_path)
    assert label.startswith(f"{first} + uncommitted changes (tree ")
    # the repository's index and object store are left as they were
    assert git(tmp_path, "diff", "--cached", "--name-only") == ""
    assert git(tmp_path, "count-objects") == objects
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "two")
    assert label.endswith(f"(tree {git(tmp_path, 'rev-parse', '--short=7', 'HEAD^{tree}')})")
    assert tree_commit(tmp_path) == git(tmp_path, "rev-parse", "--short", "HEAD")


def test_copied_files_are_named_by_their_tree(tmp_path):
    """A commit's files unpacked inside another checkout's ignored folder (how an older tree runs
    beside this one on the GPU machine), or outside any checkout, are named by that commit's tree,
    not by the enclosing checkout's commit."""
    repo, outside, ignore = tmp_path / "repo", tmp_path / "outside", "/trees/\n*.log\n"
    repo.mkdir()
    first_commit(repo, ignore)
    tree = git(repo, "rev-parse", "--short=7", "HEAD^{tree}")
    (repo / "a.py").write_text("x = 2\n")
    git(repo, "commit", "-qam", "two")
    for copy in (repo / "trees" / "one", outside):
        copy.mkdir(parents=True)
        first_files(copy, ignore)
        (copy / "run.log").write_text("ignored by the copy's own .gitignore\n")
        assert tree_commit(copy) == f"no commit (tree {tree})"
