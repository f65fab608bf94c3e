"""tools/profile_cpu_stages.py: the stage harness builds against a source tree, times
every stage of the forward, and two builds of one tree compute the same results."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "profile_cpu_stages.py"
STAGES = ("logits", "mask", "match", "exps", "rows", "values", "total")


def _has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


pytestmark = pytest.mark.skipif(
    not (_has_avx2() and shutil.which("g++")), reason="needs g++ and an x86-64 CPU with AVX2 and FMA"
)


def _run(*args: str) -> str:
    command = [sys.executable, str(TOOL), "--n", "45", "--pairs", "2", "--reps", "2", "--rounds", "1", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_every_stage_is_timed(path):
    if path == "avx512" and " avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512F")
    text = _run("--path", path, "--block-size", "8")
    for stage in STAGES:
        row = re.search(rf"^\| {stage} \| (\d+) \| ([\d.]+)% \|$", text, re.M)
        assert row, f"no row for {stage} in:\n{text}"
        assert int(row.group(1)) > 0
    assert re.search(r"^checksum new: [0-9a-f]{16}$", text, re.M)


def test_two_builds_of_one_tree_compute_the_same():
    text = _run("--against", str(ROOT))
    checksums = re.findall(r"^checksum (?:new|old): ([0-9a-f]{16})$", text, re.M)
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert re.search(r"^\| total \| \d+ \| \d+ \| [\d.]+ \|$", text, re.M)
