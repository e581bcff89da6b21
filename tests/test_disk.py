"""Disk faults: free space and write access checked before any command works, a full disk during a save said
in one line with nothing left behind, and checkpoint files that other users can read (per the umask)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors import SafetensorError

import dynamoe.checkpoint as checkpoint_module
import dynamoe.data.build as build_module
from dynamoe.checkpoint import latest_checkpoint, save_model
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.hf import export_hf
from dynamoe.model import Transformer

COMMANDS = ("train", "data build", "export", "import", "retrofit", "bench", "analyze")
OTHER_USER = 65534  # nobody
PROGRESS = re.compile(r"data: |[\w ]+: +\d+%\|")


@pytest.fixture(scope="module")
def workspace(tiny_corpus: Path) -> Iterator[Path]:
    """Inputs for every command that writes (a corpus, a static top-k checkpoint, its Hugging Face export, a text
    file) in a folder every user may read, so that another user can run the commands on them."""
    root = Path(tempfile.mkdtemp(prefix="dynamoe-disk-"))
    root.chmod(0o755)
    shutil.copytree(tiny_corpus, root / "corpus")
    torch.manual_seed(0)
    save_model(root / "ckpt", Transformer(tiny(router="topk")), tiny_corpus / "tokenizer.json")
    export_hf(root / "ckpt", root / "hf")
    (root / "text.txt").write_text("To be, or not to be, that is the question.\n\n" * 2000)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def command_line(name: str, root: Path, out: Path) -> list[str]:
    """A small, quick invocation of a command that writes to `out`."""
    ckpt, corpus = str(root / "ckpt"), str(root / "corpus")
    return {
        "train": ["train", "--data", corpus, "--out", str(out), "--preset", "tiny", "--steps", "1", "--batch-size", "1",
                  "--eval-batches", "0", "--warmup-steps", "1", "--no-progress"],
        "data build": ["data", "build", "--data", str(root / "text.txt"), "--out", str(out), "--vocab-size", "300"],
        "export": ["export", ckpt, str(out)],
        "import": ["import", str(root / "hf"), str(out)],
        "retrofit": ["retrofit", ckpt, str(out), "--target-k", "1.5", "--mode", "free", "--corpus", corpus,
                     "--eval-tokens", "0", "--no-progress"],
        "bench": ["bench", ckpt, "--corpus", corpus, "--out", str(out), "--decode-tokens", "2", "--repeats", "1",
                  "--eval-tokens", "32", "--batch-sizes", "2", "--device", "cpu", "--no-progress"],
        "analyze": ["analyze", ckpt, "--corpus", corpus, "--out", str(out), "--max-tokens", "64", "--sample-tokens", "8"],
    }[name]


def one_line_error(code: int, err: str) -> str:
    """The one error line of a failed command, progress reports (`data: ...` lines, bars) aside."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.match(line)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dynamoe: error: ") and "Traceback" not in err, err
    return lines[0]


def disk_with_free_bytes(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Every disk reports `free` bytes left."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))


# ---------------------------------------------------------------- checked before the work starts

@pytest.mark.parametrize("command", COMMANDS)
def test_too_little_free_space_is_refused_before_the_work(command: str, workspace: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    disk_with_free_bytes(monkeypatch, 1000)

    def slow_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the work started before the disk was checked")

    for module, name in (("dynamoe.retrofit", "calibrate_thresholds"), ("dynamoe.bench", "measure_round"),
                         ("dynamoe.data.build", "_build_into"), ("dynamoe.train", "train_step")):
        monkeypatch.setattr(f"{module}.{name}", slow_work)
    out = tmp_path / "out"
    code = main(command_line(command, workspace, out))
    line = one_line_error(code, capsys.readouterr().err)
    assert "not enough disk space in" in line and "bytes" in line and "but 1,000 bytes are free" in line, line
    assert not out.exists()


def test_a_real_small_disk_is_refused_up_front(workspace: Path) -> None:
    """On a 1 MiB tmpfs (where the machine lets an unprivileged namespace mount one), training is refused up front."""
    mount = Path(tempfile.mkdtemp(prefix="dynamoe-tmpfs-"))
    argv = command_line("train", workspace, mount / "run")
    script = (f"mount -t tmpfs -o size=1m tmpfs {mount} && "
              f"{sys.executable} -m dynamoe {' '.join(argv)}")
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare")
    finally:
        shutil.rmtree(mount, ignore_errors=True)
    if "mount" in done.stderr and "dynamoe" not in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    line = one_line_error(done.returncode, done.stderr)
    assert f"not enough disk space in {mount / 'run'}: the run's checkpoints needs about" in line


def as_other_user(script: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script as a user who does not own the test's files (nobody, when the tests run as root)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no other user to test with")
        prefix = ["setpriv", f"--reuid={OTHER_USER}", f"--regid={OTHER_USER}", "--clear-groups"]
    scratch = Path(tempfile.mkdtemp(prefix="dynamoe-home-"))
    scratch.chmod(0o777)
    env = {**os.environ, "HOME": str(scratch), "MPLCONFIGDIR": str(scratch), "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        if prefix and subprocess.run([*prefix, sys.executable, "-c", "import dynamoe"], capture_output=True,
                                     timeout=120, env=env).returncode != 0:
            pytest.skip("the other user cannot read this checkout (a private folder above it, such as mktemp -d's): "
                        "no other user to test with")
        return subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


RUN_COMMANDS = """
import contextlib, io, json, sys
from dynamoe.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results[name] = [main(argv), err.getvalue()]
print(json.dumps(results))
"""


def test_an_unwritable_out_is_one_line_in_every_command(workspace: Path) -> None:
    locked = workspace / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o555)  # nobody may write here: not the other user, nor (when not root) its owner
    argvs = {name: command_line(name, workspace, locked / name.replace(" ", "-")) for name in COMMANDS}
    argvs["bench into the folder itself"] = [*command_line("bench", workspace, locked)]
    done = as_other_user(RUN_COMMANDS.replace("sys.argv[1]", repr(json.dumps(argvs))))
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (code, err) in json.loads(done.stdout.splitlines()[-1]).items():
        line = one_line_error(code, err)
        assert f"cannot write to {locked}" in line and "permission denied" in line, (name, line)
    assert list(locked.iterdir()) == []


def test_an_out_that_is_a_file_is_one_line(workspace: Path, tmp_path: Path, capsys) -> None:
    file = tmp_path / "results.txt"
    file.write_text("mine")
    for command in ("bench", "analyze", "train"):
        line = one_line_error(main(command_line(command, workspace, file)), capsys.readouterr().err)
        assert f"{file} cannot be a folder because {file} is a file" in line, line
    assert file.read_text() == "mine"


# ---------------------------------------------------------------- a disk that fills up while saving

def short_write_of_torch_save(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def safetensors_out_of_space(tensors: Any, path: Any, metadata: Any = None) -> None:
    Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def copy_out_of_space(source: Any, target: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


FULL_DISK = {"torch.save": ("torch.save", short_write_of_torch_save),
             "safetensors": ("dynamoe.checkpoint.save_file", safetensors_out_of_space),
             "copy": ("dynamoe.checkpoint.shutil.copyfile", copy_out_of_space)}


@pytest.mark.parametrize("writer", list(FULL_DISK))
def test_a_full_disk_during_a_save_says_so_and_leaves_nothing(writer: str, tiny_corpus: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_corpus), "--out", str(run), "--preset", "tiny", "--steps", "4", "--batch-size", "2",
            "--save-every", "2", "--eval-batches", "0", "--warmup-steps", "1", "--no-progress"]
    target, fault = FULL_DISK[writer]
    saves = 0
    real_save = checkpoint_module.save_checkpoint

    def second_save_fails(*args: Any, **kwargs: Any) -> Path:
        nonlocal saves
        saves += 1
        if saves == 2:
            monkeypatch.setattr(target, fault)  # the disk fills up during the second save
        return real_save(*args, **kwargs)

    monkeypatch.setattr("dynamoe.train.save_checkpoint", second_save_fails)
    line = one_line_error(main(argv), capsys.readouterr().err)
    assert line == (f"dynamoe: error: disk full while writing checkpoint ckpt-0000004 to {run}; free some space, then "
                    "run the same command with --resume to continue"), line
    assert sorted(path.name for path in run.iterdir()) == ["ckpt-0000002", "latest", "log.jsonl", "tb"]  # no staging
    assert latest_checkpoint(run) == run / "ckpt-0000002"
    monkeypatch.undo()  # space freed: the same command with --resume carries on
    assert main([*argv, "--resume"]) == 0
    assert latest_checkpoint(run) == run / "ckpt-0000004"


def test_a_full_disk_during_an_import_leaves_nothing(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys) -> None:
    monkeypatch.setattr("dynamoe.checkpoint.save_file", safetensors_out_of_space)
    line = one_line_error(main(["import", str(workspace / "hf"), str(tmp_path / "imported")]), capsys.readouterr().err)
    assert line.startswith("dynamoe: error: disk full while writing the imported checkpoint imported to ")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_corpus_build_leaves_nothing(workspace: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    write_split = build_module.write_split

    def out_of_space(out_dir: Path, split: str, *args: Any) -> Any:
        if split == "test":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_split(out_dir, split, *args)

    monkeypatch.setattr(build_module, "write_split", out_of_space)
    line = one_line_error(main(command_line("data build", workspace, tmp_path / "corpus")), capsys.readouterr().err)
    assert line.startswith(f"dynamoe: error: disk full while writing the corpus {tmp_path / 'corpus'} to ")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- files other users can read

def modes(folder: Path) -> set[tuple[str, int]]:
    return {(path.name, stat.S_IMODE(path.stat().st_mode)) for path in folder.iterdir()}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_written_file_follows_the_umask(umask: int, workspace: Path, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        assert main(command_line("train", workspace, tmp_path / "run")) == 0
        assert main(command_line("export", workspace, tmp_path / "export")) == 0
        assert main(command_line("import", workspace, tmp_path / "import")) == 0
    finally:
        os.umask(previous)
    folders = [latest_checkpoint(tmp_path / "run"), tmp_path / "export", tmp_path / "import"]
    for folder in folders:
        assert folder is not None and stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        assert {mode for _, mode in modes(folder)} == {0o666 & ~umask}, modes(folder)


LOAD = """
import sys
from dynamoe.checkpoint import load_model
from dynamoe.errors import DynamoeError
try:
    print(load_model(sys.argv[1])[1].dim)
except DynamoeError as error:
    print(error)
"""


def test_another_user_can_load_a_checkpoint_and_is_told_when_not_allowed(workspace: Path, tiny_corpus: Path) -> None:
    previous = os.umask(0o022)
    try:
        folder = Path(tempfile.mkdtemp(prefix="dynamoe-shared-"))
        folder.chmod(0o755)
        ckpt = save_model(folder / "ckpt", Transformer(tiny()), tiny_corpus / "tokenizer.json")
    finally:
        os.umask(previous)
    try:
        done = as_other_user(LOAD.replace("sys.argv[1]", repr(str(ckpt))))
        assert done.stdout.strip() == "64", done.stdout + done.stderr[-2000:]
        (ckpt / "model.safetensors").chmod(0o600 if os.geteuid() == 0 else 0o000)
        done = as_other_user(LOAD.replace("sys.argv[1]", repr(str(ckpt))))
        assert "model.safetensors is not readable by this user (permission denied" in done.stdout, done.stdout + done.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)
