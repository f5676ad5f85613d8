"""The packaged model's captions and seeded stories, recorded before the issue-17 move (scripts/record_behaviour.py).

Recorded in a fresh process, as a user's first story is: in a long test session another test may leave torch's
compiler unusable, and an eager decode step samples other stories than the compiled one. A change that means to alter
them (a new reranker, new weights) re-records with `python scripts/record_behaviour.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_packaged

pytestmark = [pytest.mark.slow, requires_packaged]

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "behaviour.json"


def test_captions_and_seeded_stories_are_as_recorded(tmp_path):
    from mmstory.factory import packaged_models

    if "mmstory-small" not in packaged_models():
        pytest.skip("mmstory-small weights are not shipped in this checkout")
    now_path = tmp_path / "now.json"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's mmstory, as the test session's
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "record_behaviour.py"), "--out", str(now_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    before, now = json.loads(FIXTURE.read_text()), json.loads(now_path.read_text())
    assert now["captions"] == before["captions"]
    assert now["stories_seed0"] == before["stories_seed0"]
