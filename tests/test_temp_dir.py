"""The suite leaves nothing in /tmp: every process it starts uses the session's own temp folder
(tests/conftest.py `session_temp_dir`), which is removed when the session ends."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def test_a_torchrun_launch_writes_its_log_folder_into_the_session_temp_dir(session_temp_dir):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "--no-python", "true"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(tempfile.gettempdir()) == session_temp_dir and os.environ["TMPDIR"] == str(session_temp_dir)
    # (/tmp itself is not compared before and after: other jobs on the machine launch torchrun too)
    assert list(session_temp_dir.glob("torchelastic_*")), "the launcher wrote its log folder elsewhere"
