"""The stat cache's racy rule, with and without a file system that stamps finely."""
from __future__ import annotations

import os

import pytest

from offbuild.hashing import FileHasher, StatEntry, fine_timestamps_device, hash_file_contents


def written(tmp_path, text: str = "fresh\n"):
    path = tmp_path / "out.txt"
    path.write_text(text)
    return str(path)


def test_a_fresh_file_is_hashed_again_where_timestamps_may_be_coarse(tmp_path):
    path = written(tmp_path)
    hasher = FileHasher({})
    assert hasher.digest(path) == hasher.digest(path)
    assert hasher.files_hashed == 2  # recorded within 2 s of its mtime: racy
    assert not hasher.entries[path].settled


def test_a_fresh_file_vouches_at_once_on_a_finely_stamped_device(tmp_path):
    path = written(tmp_path)
    hasher = FileHasher({}, fine_device=os.stat(path).st_dev)
    assert hasher.digest(path) == hasher.digest(path)
    assert hasher.files_hashed == 1
    assert hasher.entries[path].settled  # so the snapshot trusts its stat too


def test_another_device_keeps_the_racy_rule(tmp_path):
    path = written(tmp_path)
    hasher = FileHasher({}, fine_device=os.stat(path).st_dev + 1)
    hasher.digest(path)
    hasher.digest(path)
    assert hasher.files_hashed == 2


def test_a_racy_entry_from_the_store_keeps_the_clocks_rule_even_on_a_finely_stamped_device(tmp_path):
    # It may have been taken under a kernel that stamped coarsely: hashed again, once.
    path = written(tmp_path)
    st = os.stat(path)
    stored = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                       hash_file_contents(path, st.st_size), st.st_mtime_ns)  # as the store loads it
    hasher = FileHasher({path: stored}, fine_device=st.st_dev)
    assert hasher.digest(path) == stored.digest and hasher.files_hashed == 1
    assert hasher.entries[path].settled


def test_the_probe_names_the_folders_device_or_none_and_leaves_nothing(tmp_path):
    device = fine_timestamps_device(str(tmp_path))
    assert device in (None, os.stat(tmp_path).st_dev)
    assert os.listdir(tmp_path) == []
    assert fine_timestamps_device(str(tmp_path / "missing")) is None


def test_where_the_probe_trusts_fresh_entries_a_quick_same_size_rewrite_is_still_caught(tmp_path):
    # The whole point of trusting fresh entries: a rewrite right after the hash must change the stat.
    device = fine_timestamps_device(str(tmp_path))
    if device is None:
        pytest.skip("this file system's timestamps are coarse: the racy rule applies instead")
    path = str(tmp_path / "f.txt")
    hasher = FileHasher({}, fine_device=device)
    for round_ in range(50):
        text = f"{round_ % 10}\n"
        with open(path, "w") as handle:
            handle.write(text)
        assert hasher.digest(path) == hash_file_contents(path, len(text)), f"stale digest in round {round_}"
