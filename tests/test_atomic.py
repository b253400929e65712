"""Crash-safe writes (aura.atomic): the modes they create, what a refused write leaves behind
and reports, and the writability check commands run before long work."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from aura import atomic
from aura.atomic import atomic_dir, atomic_write_text, check_writable_dir
from faults import FsFaults


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_directories_get_the_modes_the_umask_allows(tmp_path: Path,
                                                              umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "w.bin").write_bytes(b"w")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.json") == 0o666 & ~umask
    assert mode(tmp_path / "ckpt") == 0o777 & ~umask
    assert mode(tmp_path / "ckpt" / "w.bin") == 0o666 & ~umask


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_a_refused_write_names_the_target_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    atomic_write_text(tmp_path / "a.json", "old")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    FsFaults(monkeypatch).deny(tmp_path, err)
    for write in (lambda: atomic_write_text(tmp_path / "a.json", "new"),
                  lambda: atomic_dir(tmp_path / "ckpt").__enter__()):
        with pytest.raises(OSError) as caught:
            write()
        assert caught.value.errno == err
        assert caught.value.filename in (str(tmp_path / "a.json"), str(tmp_path / "ckpt"))
    assert (tmp_path / "a.json").read_text() == "old"
    assert (tmp_path / "ckpt" / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ckpt"]


def test_check_writable_dir_leaves_things_as_they_were(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    check_writable_dir(tmp_path / "new" / "run")  # passes: made, probed, removed
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run").mkdir()
    check_writable_dir(tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []

    faults = FsFaults(monkeypatch)
    faults.deny(tmp_path / "run", errno.EROFS)
    faults.deny(tmp_path / "other", errno.EACCES)
    with pytest.raises(OSError) as caught:
        check_writable_dir(tmp_path / "run")
    assert (caught.value.errno, caught.value.filename) == (errno.EROFS, str(tmp_path / "run"))
    with pytest.raises(PermissionError):  # a permission error stays one
        check_writable_dir(tmp_path / "other" / "deep" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "rename-aside"])
def test_a_directory_replacing_another_leaves_the_new_one_and_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: bool) -> None:
    """Where renameat2 cannot swap (another OS or file system), the old directory is renamed
    aside first; either way only the new directory is left."""
    if not swap:
        monkeypatch.setattr(atomic, "_renameat2", None)
    for content in (b"old", b"new"):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "w.bin").write_bytes(content)
    assert (tmp_path / "ckpt" / "w.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_failed_rename_aside_puts_the_old_directory_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    monkeypatch.setattr(atomic, "_renameat2", None)
    real_replace = os.replace

    def refuse_the_new(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.startswith(".ckpt.") and Path(dst) == tmp_path / "ckpt" and \
                (Path(src) / "w.bin").read_bytes() == b"new":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new)
    with pytest.raises(PermissionError), atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "w.bin").write_bytes(b"new")
    assert (tmp_path / "ckpt" / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
