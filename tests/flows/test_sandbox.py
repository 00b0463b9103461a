"""`xenblockctl sandbox` (what `./dev demo` runs) passes end to end and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]
REPO = Path(__file__).resolve().parents[2]


def test_sandbox_passes_and_leaks_nothing(make_image: ImageFactory) -> None:
    image = make_image(size=16 << 20)
    result = subprocess.run(
        [sys.executable, "-m", "xenblockctl", "sandbox", "--json", "--image", str(image)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    names = [s["name"] for s in report["steps"]]
    assert names[-1] == "nothing leaked"
    assert any("reconnects in the same domain" in n for n in names)
    hostile = next(s for s in report["steps"] if s["name"].startswith("a hostile guest"))
    assert "refused" in hostile["detail"]
    assert "requests OK meanwhile" in hostile["detail"]
    assert bound_loops_under(image.parent) == {}
    assert b"xenblockctl sandbox: written by the guest" in image.read_bytes()
