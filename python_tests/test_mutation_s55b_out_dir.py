"""Tests that kill mutants of _files.out_dir_problem's link-loop message landed in session 55, which the other tests
let live (mut55b helper, session 55)."""

import os

from robust_ops._files import out_dir_problem

FIX = ": the links lead back to themselves, not to a folder; point one of them at a folder or remove it"


def test_a_loop_of_three_links_is_named_link_by_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("b", "a")
    os.symlink("c", "b")
    os.symlink("a", "c")
    assert out_dir_problem("a") == "it is a link loop (a -> b -> c -> a)" + FIX


def test_a_folder_above_out_that_is_a_link_loop_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("y", "x")
    os.symlink("x", "y")
    for out in ("x/run", "x/run/deeper"):
        assert out_dir_problem(out) == "x is a link loop (x -> y -> x)" + FIX
