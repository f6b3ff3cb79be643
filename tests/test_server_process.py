"""medix.server_process: how a server subprocess that ends is reported."""

from __future__ import annotations

import sys

import pytest

from medix.errors import MedixError
from medix.server_process import ServerProcess


class Dies(ServerProcess):
    """A 'server' that ends at once the way `code` says, and never answers."""

    def __init__(self, code: str, tmp_path):
        super().__init__(host="127.0.0.1", port=None, startup_timeout_s=30, log_path=tmp_path / "server.log")
        self.code = code

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code]

    def healthy(self) -> bool:
        return False


def test_a_server_killed_by_an_illegal_instruction_says_so(tmp_path):
    # what a native llama.cpp build does on a CPU that lists an instruction set it cannot run (AMX in a VM)
    server = Dies("import os, signal; os.kill(os.getpid(), signal.SIGILL)", tmp_path)
    with pytest.raises(MedixError, match=r"was killed by SIGILL \(an instruction this CPU cannot run.*"
                                         r"scripts/setup.sh\) while starting"):
        server.start()


def test_a_server_that_exits_gives_its_code_and_one_not_started_nothing(tmp_path):
    server = Dies("raise SystemExit(5)", tmp_path)
    assert server.ended() == ""  # not started
    with pytest.raises(MedixError, match="exited with code 5 while starting"):
        server.start()
