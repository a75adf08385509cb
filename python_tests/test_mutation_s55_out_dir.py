"""Tests that kill mutants of the --out rule (_files.out_dir_problem) and its callers which the other tests let live
(mut55 helper, session 55)."""

import os

import pytest

from robust_ops._files import NOT_A_FOLDER, out_dir_problem


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_an_out_that_exists_as_neither_file_nor_folder_is_not_a_folder(tmp_path):
    """A named pipe (or /dev/null) at --out is no folder either: only a folder, or nothing yet, takes the results."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for staged in (True, False):
        assert out_dir_problem(pipe, staged) == NOT_A_FOLDER
    if os.path.exists(os.devnull):
        assert out_dir_problem(os.devnull) == NOT_A_FOLDER


def _refuse_writes_in(read_only, monkeypatch):
    """Fake a folder this process cannot write in (as root, permission bits refuse nothing)."""
    import errno

    from robust_ops import _files

    real = _files.check_writable

    def check_writable(folder):
        if os.fspath(folder) == os.fspath(read_only):
            raise PermissionError(errno.EACCES, "Permission denied")
        real(folder)

    monkeypatch.setattr(_files, "check_writable", check_writable)


def test_unstaged_results_need_the_folder_they_are_made_in_or_written_in(tmp_path, monkeypatch):
    """staged=False (train writes in out alone): a folder not made yet needs the folder above to make it in, one made
    already only itself; staged (eval, demo) needs the folder above either way, to stage beside out."""
    locked = tmp_path / "locked"
    (locked / "made").mkdir(parents=True)
    _refuse_writes_in(locked, monkeypatch)
    refused = f"cannot write in {locked} (Permission denied)"
    assert out_dir_problem(locked / "new", staged=False) == refused
    assert out_dir_problem(locked / "new" / "deeper", staged=False) == refused
    assert out_dir_problem(locked / "made", staged=False) is None
    assert out_dir_problem(locked / "made", staged=True) == refused
    assert out_dir_problem(locked / "made" / "new", staged=True) is None


def test_fit_refuses_an_out_dir_it_cannot_write_with_the_writes_errno_and_the_way_on(tmp_path, monkeypatch):
    """fit's OSError carries the errno of the write that was refused (EACCES here, not ENOENT) and says to pass a
    folder this process can write; a link to nowhere is ENOENT, without that advice."""
    import errno

    import torch

    from robust_ops.train import fit

    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_writes_in(locked, monkeypatch)
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    kwargs = dict(epochs=1, batch_size=2, lr=0.1, progress=False)
    with pytest.raises(OSError) as caught:
        fit(model, "standard", data, out_dir=locked / "run", **kwargs)
    assert caught.value.errno == errno.EACCES
    assert str(caught.value).endswith(f"out_dir={os.fspath(locked / 'run')!r}: cannot write in {locked} (Permission "
                                      "denied); pass a folder this process can write")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError) as caught:
        fit(model, "standard", data, out_dir=link, **kwargs)
    assert caught.value.errno == errno.ENOENT
    assert str(caught.value).endswith(f"it is a link to {tmp_path / 'nowhere'}, which does not exist; make that "
                                      "folder first")


def test_the_command_lines_out_that_is_a_file_is_said_in_its_own_words(tmp_path):
    """cli.check_out says a file at --out as "--out: PATH exists and is not a folder" (the flag's own wording), the
    rule's other reasons after "--out: PATH: "."""
    from robust_ops.cli import CLIError, check_out

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CLIError) as caught:
        check_out(afile, "--out")
    assert str(caught.value) == f"--out: {afile} exists and is not a folder"
    with pytest.raises(CLIError) as caught:
        check_out(afile / "sub", "--out")
    assert str(caught.value) == f"--out: {afile / 'sub'}: {afile} is a file, not a folder"


def test_write_results_needs_the_folder_above_an_out_dir_made_already(tmp_path, monkeypatch):
    """write_results stages its files beside out_dir and moves them in, so an out_dir made already in a folder it
    cannot write is refused before any figure, naming that folder; evaluate's rule is the CLI's staged one."""
    from robust_ops.evaluate import EvalError, _check_out_dir

    locked = tmp_path / "locked"
    (locked / "made").mkdir(parents=True)
    _refuse_writes_in(locked, monkeypatch)
    with pytest.raises(EvalError) as caught:
        _check_out_dir(locked / "made")
    assert str(caught.value).endswith(f"out_dir={os.fspath(locked / 'made')!r}: cannot write in {locked} (Permission "
                                      "denied)")
    _check_out_dir(tmp_path / "fine")
