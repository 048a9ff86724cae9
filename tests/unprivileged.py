"""Run a command as an ordinary user would: root (as in CI containers) writes into read-only folders anyway, so
permission tests drop that power with `setpriv` (util-linux), or are skipped where it is missing."""

import os
import shutil

import pytest

ROOT_WITHOUT_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                         "--bounding-set=-dac_override,-dac_read_search", "--"]


def unprivileged(argv: list[str]) -> list[str]:
    """argv, run without root's permission override when this process is root."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv")
    return ROOT_WITHOUT_OVERRIDE + argv
