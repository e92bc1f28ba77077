import errno
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cxr_fast.errors import CxrFastError
from cxr_fast.outputs import lock_path, new_folder, replacing_folder, settle_move, settle_replacement, writing
from tests.conftest import HOLDING_LOCK, another_process


def test_old_results_survive_a_failed_redo(tmp_path):
    out = tmp_path / "eval"
    with replacing_folder(out, force=False, what="an evaluation") as work:
        (work / "metrics.json").write_text("old")
    assert (out / "metrics.json").read_text() == "old"
    with pytest.raises(CxrFastError, match="--force"):
        with replacing_folder(out, force=False, what="an evaluation"):
            pass
    with pytest.raises(RuntimeError):
        with replacing_folder(out, force=True, what="an evaluation") as work:
            (work / "metrics.json").write_text("half")
            raise RuntimeError("crash halfway")
    assert (out / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    with replacing_folder(out, force=True, what="an evaluation") as work:
        (work / "metrics.json").write_text("new")
    assert (out / "metrics.json").read_text() == "new"


def test_a_kill_while_old_results_are_replaced_leaves_them_whole_beside_the_folder(tmp_path, monkeypatch):
    # The old folder is moved aside, not deleted, before the new one takes its name: a kill between the two steps
    # leaves the old results whole in .NAME.old (deleting them first could leave neither).
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.html").write_text("old")
    real_rename = Path.rename

    def killed_at_the_second_rename(self, target):
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt), replacing_folder(out, force=True, what="an evaluation") as work:
        (work / "report.html").write_text("new")
    assert (tmp_path / ".eval.old" / "report.html").read_text() == "old"
    monkeypatch.undo()
    with pytest.raises(CxrFastError, match="already there"):  # the next call first finishes the replacement: the
        with replacing_folder(out, force=False, what="an evaluation"):  # new results were complete
            pass
    assert (out / "report.html").read_text() == "new" and not (tmp_path / ".eval.old").exists()


def test_a_replacement_killed_before_its_new_results_exist_gives_the_old_ones_back(tmp_path):
    (tmp_path / ".eval.old").mkdir()  # moved aside, and then the process was killed with no .partial left
    (tmp_path / ".eval.old" / "report.html").write_text("old")
    settle_replacement(tmp_path / "eval")
    assert (tmp_path / "eval" / "report.html").read_text() == "old" and not (tmp_path / ".eval.old").exists()


def test_a_move_into_an_empty_folder_stopped_halfway_is_finished_by_the_next_look(tmp_path, monkeypatch):
    # a kill while new_folder moved the results into an existing empty --out left some there and the rest hidden in
    # its work folder: compare's rerun said "already exists" of half a comparison
    out = tmp_path / "cmp"
    out.mkdir()
    real_rename, moved = Path.rename, []

    def killed_after_the_first_move(self, target):
        if moved:
            raise KeyboardInterrupt
        moved.append(self.name)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_the_first_move)
    with pytest.raises(KeyboardInterrupt), new_folder(out) as work:
        for name in ("a.csv", "b.csv", "report.html"):
            (work / name).write_text(name)
    monkeypatch.undo()
    assert len([p for p in out.iterdir() if p.name != ".partial"]) == 1
    settle_move(out)
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "b.csv", "report.html"]
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / ".partial").mkdir()  # killed before any move: nothing complete to finish
    (tmp_path / "stopped" / ".partial" / "a.csv").write_text("half")
    settle_move(tmp_path / "stopped")
    assert [p.name for p in (tmp_path / "stopped").iterdir()] == [".partial"]


def test_a_full_disk_leaves_no_half_file_and_names_the_file(tmp_path, monkeypatch):
    import errno

    import torch

    from cxr_fast.outputs import write_tensors, write_text

    def disk_full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    monkeypatch.setattr(Path, "write_text", disk_full)
    for write, path in ((lambda p: write_tensors({"w": torch.zeros(2)}, p), tmp_path / "w.safetensors"),
                        (lambda p: write_text(p, "text"), tmp_path / "notes.txt")):
        with pytest.raises(OSError) as e:
            write(path)
        assert e.value.filename == str(path) and list(tmp_path.iterdir()) == []


def test_the_cli_says_a_full_disk_in_one_line(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    import cxr_fast.data.synth
    from cxr_fast.cli import app

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "src" / "x.png"))

    monkeypatch.setattr(cxr_fast.data.synth, "synthesize", disk_full)
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "src")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {tmp_path / 'src' / 'x.png'}: No space left on device" in result.output.replace("\n", "")


def test_storage_errors_a_user_can_act_on_are_one_line():
    from cxr_fast.errors import storage_problem

    # a folder that cannot be made there (under /proc), a file in the way, a folder given for a file
    for code, name in ((errno.ENOENT, "/proc/xx"), (errno.ENOTDIR, "run/eval/x"), (errno.EISDIR, "out.csv")):
        assert storage_problem(OSError(code, os.strerror(code), name)) == f"{name}: {os.strerror(code)}"
    assert storage_problem(OSError(errno.EIO, "Input/output error")) is None  # a damaged disk: not the user's to fix
    # a name too long, or one the system refuses (Windows: CON, "a:b"); EINVAL naming no file could be anything
    assert storage_problem(OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300)) == "x" * 300 + ": File name too long"
    assert storage_problem(OSError(errno.EINVAL, "Invalid argument", r"C:\out\CON")) == (
        r"C:\out\CON: Invalid argument (not a name this system or disk accepts)")
    assert storage_problem(OSError(errno.EINVAL, "Invalid argument")) is None


def test_a_name_windows_keeps_for_a_device_is_refused_up_front_there_only(tmp_path, monkeypatch):
    # `--out models/CON` (or nul.txt, COM1, LPT1.tar) cannot be made on Windows: the folder is refused before the
    # work, not after it; Linux and macOS take those names
    from cxr_fast import outputs

    names = ("CON", "nul.txt", "Com1", "lpt9.tar.gz", "AUX ", "PRN.")
    fine = ("CONSOLE", "con-1", "com10", "nul_x", "LPT", "aux1")
    for name in names + fine:
        outputs.check_folder_path(tmp_path / name / "run", "--out")
    monkeypatch.setattr(outputs, "os", SimpleNamespace(**{**vars(os), "name": "nt"}))  # pathlib stays Posix
    for name in names:
        with pytest.raises(CxrFastError, match=rf"^{tmp_path / name / 'run'}: '{re.escape(name)}' is a name Windows "
                                               r"keeps for a device; choose another --out$"):
            outputs.check_folder_path(tmp_path / name / "run", "--out")
    for name in fine:
        outputs.check_folder_path(tmp_path / name / "run", "--out")


def test_a_full_disk_met_inside_a_library_names_the_folder_being_written(tmp_path):
    # PIL, pandas and matplotlib raise ENOSPC without a file name: the one-line error must still say where
    import errno

    from cxr_fast.outputs import new_folder

    writers = {tmp_path / "eval": replacing_folder(tmp_path / "eval", force=False, what="an evaluation"),
               tmp_path / "new": new_folder(tmp_path / "new")}
    for out_dir, writer in writers.items():
        with pytest.raises(OSError) as e, writer:
            raise OSError(errno.ENOSPC, "No space left on device")
        assert e.value.filename == str(out_dir)
    assert list(tmp_path.iterdir()) == []


def test_a_file_replaced_when_the_disk_fills_halfway_keeps_its_old_contents(tmp_path, monkeypatch):
    # the new contents are written beside the file and renamed over it: written in place, a full disk halfway
    # through would leave the old file cut short (or, with the half file removed, gone)
    import torch
    from safetensors.torch import load_file, save_file

    from cxr_fast.outputs import write_bytes, write_tensors, write_text

    real_text, real_bytes = Path.write_text, Path.write_bytes

    def half_text(self, data, *args, **kwargs):
        real_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    def half_bytes(self, data):
        real_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "report.md").write_text("old report")
    (tmp_path / "figure.png").write_bytes(b"old figure")
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(Path, "write_text", half_text)
    monkeypatch.setattr(Path, "write_bytes", half_bytes)
    for write in (lambda: write_text(tmp_path / "report.md", "new report " * 100),
                  lambda: write_bytes(tmp_path / "figure.png", b"new figure" * 100),
                  lambda: write_tensors({"w": torch.zeros(1000)}, tmp_path / "model.safetensors")):
        with pytest.raises(OSError, match="No space left"):
            write()
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_text() == "old report"
    assert (tmp_path / "figure.png").read_bytes() == b"old figure"
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "model.safetensors", "report.md"]


def test_files_written_together_leave_no_new_part_behind_when_a_later_one_fails(tmp_path, monkeypatch):
    # a manifest written whole, then its report failing: the manifest's finished partial must go too
    from cxr_fast.outputs import write_texts

    real_text, calls = Path.write_text, []

    def second_fails(self, data, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_text(self, data, *args, **kwargs)

    (tmp_path / "manifest.csv").write_text("old manifest")
    (tmp_path / "report.md").write_text("old report")
    monkeypatch.setattr(Path, "write_text", second_fails)
    with pytest.raises(OSError):
        write_texts({tmp_path / "manifest.csv": "new manifest", tmp_path / "report.md": "new report"})
    monkeypatch.undo()
    assert calls == [".manifest.csv.partial", ".report.md.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "report.md"]
    assert (tmp_path / "manifest.csv").read_text() == "old manifest"


PAUSED_INSIDE = """import sys
from pathlib import Path
from cxr_fast.outputs import new_folder, replacing_folder
out = Path(sys.argv[1])
with (new_folder(out) if sys.argv[2] == "new" else replacing_folder(out, force=True, what="results")) as work:
    (work / "first.txt").write_text("1")
    print("ready", flush=True)
    sys.stdin.read()
    (work / "second.txt").write_text("2")
"""


@pytest.mark.parametrize("how", ["new", "replacing"])
def test_a_second_process_refuses_a_folder_being_written_and_leaves_the_first_ones_work_alone(tmp_path, how):
    # Two commands into one folder at once (two terminals, a double click): the second used to take the first's
    # .NAME.partial for a killed run's, delete it and write its own there; the first then failed on a vanished file
    # or published a folder holding half of each.
    out = tmp_path / "results"
    if how == "replacing":
        out.mkdir()
        (out / "old.txt").write_text("old")
    with another_process(PAUSED_INSIDE, out, how) as first:
        for second in (lambda: new_folder(out), lambda: replacing_folder(out, force=True, what="results")):
            with pytest.raises(CxrFastError, match=rf"results: is being written by another cxrfast process \(pid "
                                                   rf"{first.pid}\); wait for it to finish"):
                with second():
                    pass
        assert [p.name for p in (tmp_path / ".results.partial").iterdir()] == ["first.txt"]
    assert first.returncode == 0, first.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == ["first.txt", "second.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # the lock went with the first process


def test_the_settle_functions_leave_a_replacement_or_move_in_progress_alone(tmp_path):
    # Between replacing_folder's two renames (.NAME.old there, NAME not yet) and during new_folder's moves into an
    # existing folder, a look from another process used to "finish" the work as a killed run's, under the writer.
    out, moving = tmp_path / "eval", tmp_path / "compare"
    (tmp_path / ".eval.old").mkdir()
    (tmp_path / ".eval.partial").mkdir()
    (moving / ".partial").mkdir(parents=True)
    (moving / "runs.csv").write_text("moved")
    (moving / ".partial" / "report.html").write_text("not yet")
    with another_process(HOLDING_LOCK, out), another_process(HOLDING_LOCK, moving):
        settle_replacement(out)
        settle_move(moving)
        assert not out.exists() and (tmp_path / ".eval.partial").is_dir() and (tmp_path / ".eval.old").is_dir()
        assert (moving / ".partial" / "report.html").is_file()
    settle_replacement(out)  # the writer gone without finishing: now it is a killed run's work, and finished
    settle_move(moving)
    assert out.is_dir() and not (tmp_path / ".eval.old").exists()
    assert (moving / "report.html").is_file() and not (moving / ".partial").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "results"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock_path(out).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")  # a kill -9 left it
    with new_folder(out) as work:
        assert lock_path(out).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        (work / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    with writing(tmp_path / "new" / "deeper" / "x"):  # folders made for a lock go with it when nothing else is in them
        assert (tmp_path / "new" / "deeper").is_dir()
    assert not (tmp_path / "new").exists()
    with writing(Path("/")):  # nothing beside a root to hold its lock: written unlocked, as before locks
        pass


def test_an_output_name_built_from_an_input_s_name_copies_to_windows_and_usb_sticks():
    # Linux takes any character but "/" in a name; Windows, FAT and exFAT refuse these, so a run folder holding
    # interpret's 001_<name>.png or predict's <name>_heatmap.png for a film named so could not be copied there
    from cxr_fast.outputs import short_stem

    assert short_stem('CT 12:30:01 a<b>c"d|e?f*g\\h\x01 é') == "CT 12_30_01 a_b_c_d_e_f_g_h_ é"
    assert short_stem("1.2.840.113619 IMG.001 (copy)") == "1.2.840.113619 IMG.001 (copy)"  # the rest is kept
