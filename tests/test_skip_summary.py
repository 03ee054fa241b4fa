"""The end-of-run line for tests skipped because ../shared/data is absent (conftest.pytest_terminal_summary),
checked in a real pytest run of a tiny test file, and the skip reasons that line relies on."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import SHARED_ABSENT

TESTS = Path(__file__).resolve().parent
LINE = "../shared/data is absent"


def _pytest(tmp_path: Path, body: str) -> list[str]:
    """pytest (as the project runs it: -ra) on one test file holding `body`, with tests/conftest.py loaded as
    a plugin and no project ini (so no testpaths): the lines it printed."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_tiny.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "conftest", "-p", "no:cacheprovider",
                        "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


HEAD = """import pytest
from conftest import SHARED_ABSENT, needs_gum

def test_runs():
    pass

@pytest.mark.skipif(True, reason="no CUDA device")
def test_other_skip():
    pass
"""


def test_one_line_counts_the_shared_data_skips(tmp_path):
    lines = _pytest(tmp_path, HEAD + """
@pytest.mark.skipif(True, reason=f"{SHARED_ABSENT}: flickr8k-1k")
def test_flickr():
    pass

@pytest.mark.skipif(True, reason=f"{SHARED_ABSENT}: gum")
@pytest.mark.parametrize("i", [0, 1])
def test_gum(i):
    pass

def test_skips_inside():
    pytest.skip(f"{SHARED_ABSENT}: coco-mini")
""")
    found = [ln for ln in lines if LINE in ln]
    assert found == ["4 tests skipped: ../shared/data is absent (real Flickr8k/COCO/GUM data; missing: coco-mini, "
                     "flickr8k-1k, gum)"], "\n".join(lines)
    assert "1 passed, 5 skipped" in lines[-1]  # the line is about those 4 only, not the CUDA skip


def test_one_skip_in_the_singular(tmp_path):
    lines = _pytest(tmp_path, HEAD + """
@pytest.mark.skipif(True, reason=f"{SHARED_ABSENT}: gum")
def test_gum():
    pass
""")
    assert [ln for ln in lines if LINE in ln] == [
        "1 test skipped: ../shared/data is absent (real Flickr8k/COCO/GUM data; missing: gum)"], "\n".join(lines)


def test_no_line_when_nothing_skipped_for_shared_data(tmp_path):
    lines = _pytest(tmp_path, HEAD)
    assert not [ln for ln in lines if "shared/data" in ln], "\n".join(lines)
    assert "1 passed, 1 skipped" in lines[-1]


def test_every_real_data_skip_reason_starts_with_the_shared_prefix():
    """The line counts skips by their reason: one for the real data spelled otherwise would go uncounted."""
    reasons = [(p.name, m.group(1)) for p in sorted(TESTS.glob("*.py"))
               for m in re.finditer(r'reason=f?"([^"]*)"', p.read_text())]
    real = [(f, r) for f, r in reasons if re.search(r"shared|flickr|coco|gum", r, re.I)]
    assert len(real) >= 6, reasons  # conftest's four needs_* and the skipifs of three test files
    bad = [(f, r) for f, r in real if not (r.startswith(SHARED_ABSENT + ": ") or r.startswith("{SHARED_ABSENT}: "))]
    assert not bad, bad
