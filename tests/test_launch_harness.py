"""The tests' launcher harness: a launch that hangs is killed, and its processes' stacks are reported."""
import re
import sys
import textwrap
import time

import pytest

from conftest import HANGS, Launch, running

HELD = textwrap.dedent("""
    import subprocess, sys
    from dlscale.distributed import setup_logging
    setup_logging()
    def held_by_the_child():   # in a session of its own, as torchrun starts each rank
        subprocess.run([sys.executable, "-c", CHILD], start_new_session=True)
    CHILD = '''
    import os, time
    from dlscale.distributed import setup_logging
    setup_logging()
    def waiting_forever():
        time.sleep(600)
    print(f"child {os.getpid()} started", flush=True)
    waiting_forever()
    '''
    held_by_the_child()
""")


@pytest.mark.slow
def test_a_hung_launch_is_killed_and_reports_where_its_processes_wait(tmp_path, monkeypatch):
    monkeypatch.setenv(HANGS, str(tmp_path / "hangs"))
    (tmp_path / "hangs").mkdir()
    launched = Launch([sys.executable, "-c", HELD], tmp_path / "held.log", tmp_path)
    deadline = time.monotonic() + 60
    while not (started := re.search(r"child (\d+) started", launched.output())):   # its handler is set
        assert time.monotonic() < deadline and launched.proc.poll() is None, launched.output()
        time.sleep(0.1)
    child = int(started.group(1))
    with pytest.raises(AssertionError) as raised:
        launched.wait(1)
    report = str(raised.value)
    stacks = report.split("the stacks of its processes")[1]
    assert "still running after 1 s" in report and "in waiting_forever" in stacks, report
    assert "in held_by_the_child" not in stacks    # the launcher (the group's leader) is left alone
    assert launched.proc.poll() is not None
    deadline = time.monotonic() + 10
    while running(child):       # killed too, though in another session
        assert time.monotonic() < deadline, f"the launch's child {child} outlived it"
        time.sleep(0.1)
    recorded = list((tmp_path / "hangs").glob("*.txt"))
    assert len(recorded) == 1 and "in waiting_forever" in recorded[0].read_text()
