"""An export is one complete set or nothing: faults injected into real exports (exceptions,
ENOSPC, read-only folders, a path that is a directory, kill -9 at random points, two writers
at once), then the folder is checked to hold the complete old set or the complete new one and
no temp files. Also lowbit.io on its own and mismatched sets."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_helpers import (
    assert_one_complete_set,
    child_script,
    deploy_model,
    export,
    leftovers,
    snapshot,
)

import lowbit
import lowbit.io as lio
from lowbit.export.files import side_paths


@pytest.fixture(scope="module")
def models():
    return deploy_model(0), deploy_model(1)


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """The file sets of models 0 and 1, exported once for the module."""
    sets = []
    for i, model in enumerate(models):
        folder = tmp_path_factory.mktemp(f"set{i}")
        export(model, folder / "m.onnx")
        sets.append(snapshot(folder))
    return sets


@pytest.fixture
def old_set(tmp_path, exported):
    """A folder holding a complete export of model 0 (the 'previous' set)."""
    folder = tmp_path / "out"
    folder.mkdir()
    for name, data in exported[0].items():
        (folder / name).write_bytes(data)
    return folder / "m.onnx", exported[0]


@pytest.fixture
def new(exported):
    return exported[1]


def test_an_export_records_its_side_files_hashes(old_set):
    path, files = old_set
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    hashes = json.loads(props["lowbit.files"])
    assert hashes == {name: lio.sha256_bytes(files[name]) for name in
                      ("m.quant_params.json", "m.weights.safetensors")}
    loaded = lowbit.load_export(path)
    assert set(loaded.quant_params["layers"]) == {"0", "2"}
    assert {"0.weight", "2.weight"} <= set(loaded.weights)
    assert json.loads(loaded.weights_metadata["0.weight"])["bits"] == 8


@pytest.mark.parametrize("side", [0, 1], ids=["quant_params", "weights"])
def test_a_side_file_from_another_export_is_named(old_set, new, side):
    path, _ = old_set
    foreign = side_paths(path)[side]
    foreign.write_bytes(new[foreign.name])
    with pytest.raises(lowbit.MismatchedFileSetError,
                       match=rf"{foreign.name} does not belong to m.onnx"):
        lowbit.load_export(path)
    assert isinstance(lowbit.MismatchedFileSetError("x"), ValueError)


def test_a_missing_side_file_is_named(old_set):
    path, _ = old_set
    side_paths(path)[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"m.weights.safetensors.* is missing"):
        lowbit.load_export(path)


@pytest.mark.parametrize("nth", [1, 2, 3], ids=["params", "weights", "journal"])
def test_enospc_while_writing_keeps_the_old_set(old_set, models, monkeypatch, nth):
    path, before = old_set
    calls = {"n": 0}
    real = lio._write_all

    def full_disk(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(lio, "_write_all", full_disk)
    with pytest.raises(OSError, match=r"export step '.*' failed: No space left on device; "
                                      r"free some disk space") as info:
        export(models[1], path)
    assert info.value.errno == errno.ENOSPC
    assert_one_complete_set(path, before)


@pytest.mark.parametrize("fail_at", [1, 2, 3], ids=["first", "second", "onnx-last"])
def test_a_failed_rename_rolls_back_to_the_old_set(old_set, models, monkeypatch, fail_at):
    path, before = old_set
    calls = {"n": 0}
    real = os.replace

    def flaky(src, dst):
        if Path(dst).parent == path.parent and Path(src).parent.name.startswith(
                lio.STAGE_PREFIX) and not Path(src).name.startswith(("JOURNAL", "ROLLBACK")):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(lio.os, "replace", flaky)
    with pytest.raises(OSError, match=r"export step 'committing the files' failed"):
        export(models[1], path)
    monkeypatch.undo()
    assert_one_complete_set(path, before)


def test_a_first_export_that_fails_leaves_nothing(tmp_path, models, monkeypatch):
    monkeypatch.setattr(lio, "_write_all", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        export(models[0], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_refused_up_front(old_set, models, monkeypatch):
    path, before = old_set
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(ValueError, match=r"is not writable"):
        export(models[1], path)
    monkeypatch.undo()
    assert_one_complete_set(path, before)


def test_a_read_only_file_system_fails_cleanly(old_set, models, monkeypatch):
    path, before = old_set

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lio.os, "mkdir", erofs)
    with pytest.raises(OSError, match=r"Read-only file system"):
        export(models[1], path)
    monkeypatch.undo()
    assert_one_complete_set(path, before)


def test_an_onnx_path_that_is_a_directory(tmp_path, models):
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match=r"m.onnx.* is a directory"):
        export(models[0], tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert list((tmp_path / "m.onnx").iterdir()) == []


def test_a_new_export_replaces_the_whole_set(old_set, models):
    path, before = old_set
    export(models[1], path)
    after = snapshot(path.parent)
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in before)
    assert_one_complete_set(path, after)


# ----------------------------------------------------------------- dead writers' leftovers


def _fake_stage(folder: Path, files: dict[str, bytes], journal: str | None,
                backups: dict[str, bytes] | None = None) -> Path:
    stage = folder / f"{lio.STAGE_PREFIX}m.onnx-99999-dead"
    stage.mkdir()
    for name, data in files.items():
        (stage / name).write_bytes(data)
    for name, data in (backups or {}).items():
        (stage / f"old.{name}").write_bytes(data)
    if journal:
        entries = [{"name": n, "backup": True} for n in
                   ("m.quant_params.json", "m.weights.safetensors", "m.onnx")]
        (stage / journal).write_text(json.dumps(entries))
    return stage


def test_a_dead_writer_killed_between_renames_is_rolled_forward(old_set, models, new):
    path, before = old_set
    # Killed after the journal and the first rename: new params beside the old .onnx.
    (path.parent / "m.quant_params.json").write_bytes(new["m.quant_params.json"])
    rest = {k: v for k, v in new.items() if k != "m.quant_params.json"}
    _fake_stage(path.parent, rest, "JOURNAL", backups=before)
    with pytest.raises(lowbit.MismatchedFileSetError):
        lowbit.export.files.check_file_set(path)  # the raw folder is a mix...
    assert_one_complete_set(path, new)  # ...which every lowbit reader finishes first


def test_a_dead_writer_killed_while_rolling_back_is_rolled_back(old_set, models, new):
    path, before = old_set
    for name in ("m.quant_params.json", "m.weights.safetensors"):
        (path.parent / name).write_bytes(new[name])
    _fake_stage(path.parent, {"m.onnx": new["m.onnx"]}, "ROLLBACK", backups=before)
    assert_one_complete_set(path, before)


def test_a_dead_writer_before_its_journal_is_discarded(old_set, models, new):
    path, before = old_set
    _fake_stage(path.parent, new, None)
    (path.parent / f".m.onnx.1234{lio.TMP_SUFFIX}").write_bytes(b"half a file")
    export(models[0], path.parent / "n.onnx")  # any later export cleans the folder
    assert leftovers(path.parent) == []
    assert {k: v for k, v in snapshot(path.parent).items() if k.startswith("m.")} == before


def test_a_live_writers_staging_folder_is_left_alone(old_set):
    path, before = old_set
    stage = _fake_stage(path.parent, {}, None)
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer holds its staging folder
        assert lio.recover(path.parent) == []
        assert stage.exists()
    finally:
        os.close(fd)
    assert lio.recover(path.parent) == [stage]
    assert_one_complete_set(path, before)


# ---------------------------------------------------------------- real processes, kill -9


def _spawn(script: Path, path: Path, seed: int, slow: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(path), str(seed), str(slow)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _wait_for(proc: subprocess.Popen, word: str) -> bool:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return True
    return False


def test_kill_9_at_random_points_leaves_one_complete_set(old_set, tmp_path):
    """Three child exports killed with SIGKILL: two inside the commit (renames slowed to
    0.15 s each), one while exporting; each time the folder then holds the complete old set
    or the complete new one."""
    path, before = old_set
    script = child_script(tmp_path)
    rng = random.Random(1234)
    outcomes = []
    for marker, delay in [("commit", rng.uniform(0.16, 0.44)), ("commit", rng.uniform(0.0, 0.3)),
                          ("ready", rng.uniform(0.0, 0.5))]:
        proc = _spawn(script, path, 1, 0.15)
        try:
            assert _wait_for(proc, marker), "the child export failed before the kill point"
            time.sleep(delay)
            proc.kill()
        finally:
            proc.wait(timeout=60)
        outcomes.append(assert_one_complete_set(path, before))
        # Put the old set back for the next round.
        for name, data in before.items():
            lio.atomic_write_bytes(path.parent / name, data)
    assert outcomes[2] == "old"  # killed before the commit point


def test_two_processes_exporting_to_one_path(old_set, tmp_path):
    path, before = old_set
    script = child_script(tmp_path)
    procs = [_spawn(script, path, seed, 0.0) for seed in (1, 2)]
    for proc in procs:
        assert _wait_for(proc, "done")
        proc.wait(timeout=120)
        assert proc.returncode == 0
    assert assert_one_complete_set(path, before) == "new"


# --------------------------------------------------------------------------- lowbit.io alone


def test_file_set_commits_all_or_nothing(tmp_path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with lio.FileSet(targets) as fs:
        fs.write_bytes(targets[0], b"a1")
        fs.write_bytes(targets[1], b"b1")
        fs.commit()
    assert [t.read_bytes() for t in targets] == [b"a1", b"b1"]
    with pytest.raises(KeyError), lio.FileSet(targets) as fs:
        fs.write_bytes(targets[0], b"a2")
        raise KeyError("the caller fails before commit")
    assert [t.read_bytes() for t in targets] == [b"a1", b"b1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


@pytest.mark.parametrize(("targets", "match"), [
    ([], "at least one file"),
    (["x/a", "y/b"], "share one folder"),
    (["a", "a"], "distinct files"),
], ids=["empty", "two-folders", "duplicate"])
def test_file_set_rejects_bad_targets(tmp_path, targets, match):
    with pytest.raises(ValueError, match=match):
        lio.FileSet([tmp_path / t for t in targets])


def test_file_set_commit_needs_every_file(tmp_path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(ValueError, match=r"'b.txt' was never written"), lio.FileSet(targets) as fs:
        fs.write_bytes(targets[0], b"a")
        fs.commit()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"folder .*missing.* does not exist"):
        lio.atomic_write_text(tmp_path / "missing" / "a.txt", "x")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        lio.atomic_write_text(tmp_path / "d", "x")
    (tmp_path / "a.txt").write_text("old")
    monkeypatch.setattr(lio, "_write_all", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        lio.atomic_write_text(tmp_path / "a.txt", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]
    assert (tmp_path / "a.txt").read_text() == "old"
