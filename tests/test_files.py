"""mmstory.files.atomic_write: the target holds the old file or the whole new one, and no temporary file stays."""

import pytest

from mmstory.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def half(tmp):
        tmp.write_text("half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half, tmp_name=".report.json.tmp")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_file_stamp_changes_with_the_file_and_keys_the_gguf_cache_as_before(tmp_path):
    import hashlib
    import os

    from mmstory.files import file_stamp

    path = tmp_path / "w.gguf"
    path.write_bytes(b"abc")
    first = file_stamp(path)
    assert first[0] == str(path.resolve()) and first[1] == 3
    os.utime(path, ns=(first[2] + 10**9, first[2] + 10**9))
    assert file_stamp(path) != first
    # the GGUF conversion cache's key is the one written before file_stamp existed, so its caches stay valid
    stat = path.stat()
    old_key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    assert hashlib.sha1("|".join(map(str, file_stamp(path))).encode()).hexdigest()[:12] == old_key
