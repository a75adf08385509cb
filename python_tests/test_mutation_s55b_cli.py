"""Tests that kill mutants of cli's reading of a torchrun peer killed outright (_peer_lost) landed in session 55,
which the other tests let live (mut55b helper, session 55)."""

import pytest

from robust_ops import cli


@pytest.mark.parametrize("text, world, lost", [
    ("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:23966: Connection reset by peer. ...", "2",
     "Connection reset by peer"),
    ("[gloo/transport/tcp/pair.cc:589] Connection closed by peer [127.0.0.1]:23966", "2", "Connection closed by peer"),
    ("[gloo/transport/tcp/pair.cc:589] Connection closed by peer [127.0.0.1]:23966", "1", None),
    ("[nccl] Connection reset by peer", "2", None),
])
def test_a_gloo_peer_lost_is_read_under_torchrun_only(monkeypatch, text, world, lost):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert cli._peer_lost(RuntimeError(text)) == lost
    assert cli._peer_lost(ValueError(text)) is None
