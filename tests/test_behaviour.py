"""Behaviour every framework folder shares, tested once over the launch table (tests/recipes.py): a folder that
adds its row there gets these tests free.
"""

import re
import socket
import time

import pytest
from recipes import RECIPES, wait_all

pytestmark = [pytest.mark.contract, pytest.mark.timeout(300)]

ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")


@pytest.mark.parametrize("folder", sorted(RECIPES))
def test_busy_master_port_is_one_line_and_exit_2_not_a_hang(folder, tmp_path):
    """MASTER_PORT held by another program: rank 0 cannot host the rendezvous there. It must say so in one line and
    exit 2 within --timeout + 30 s (CONTRACT.md C4), and rank 1 must not wait forever either."""
    recipe, timeout = RECIPES[folder], 8
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        start = time.monotonic()
        procs = recipe.srun([*recipe.small, "--timeout", timeout, "--data-dir", tmp_path / "data"], 2,
                            busy.getsockname()[1], stderr_apart=True)
        codes, outs = wait_all(procs, timeout=150)
    seconds = time.monotonic() - start
    errors = [ln for ln in outs[0][1].splitlines() if ln.strip()]
    assert codes[0] == 2 and codes[1] != 0, (codes, outs)
    assert len(errors) == 1 and ERROR_LINE.match(errors[0]), f"rank 0's stderr is not one error line: {outs[0][1]}"
    assert ("another process already listens on that port" in errors[0]
            or f"did not finish within {timeout} s" in errors[0]), errors[0]
    assert seconds < timeout + 30 + 60, f"{seconds:.0f} s"  # + 60: interpreters importing a framework on a busy CI core
