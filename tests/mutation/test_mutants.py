"""Mutation check: switch off each named safety rule, one at a time, and prove a test notices.

Issue 16 found ten rules the host suite could lose without a single failure. Each row of MUTANTS
names one rule: the file, the exact original text, the text that switches the rule off, and the
tests that must then fail. Every mutant is applied to a copy of the package (with tests/ and
hotplug/, so the block script run as a subprocess is the mutated one too) in a temporary
directory, never to the checkout, and only its own tests run there (~3 s each).

`test_named_tests_pass_unmutated` runs every named test on an unmutated copy first: a mutant's
failure then means the rule was missed, not that the copy is broken. A row whose original text is
no longer in the file fails loudly (the rule moved: update the row, do not drop it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("needs_loop")]


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository
    original: str  # must occur exactly once
    mutated: str
    tests: tuple[str, ...]  # pytest node ids, at least one of which must fail


SHARING = "xenblockctl/blockscript/sharing.py"
SHARING_UNIT = "tests/unit/test_blockscript_sharing.py"
SHARING_HOST = "tests/flows/test_sharing_devices.py"

MUTANTS = (
    Mutant(
        "sharing: another backend's claim on the same block device",
        SHARING,
        "if wanted.devt is not None and claim.devt == wanted.devt:",
        "if False:",
        (
            f"{SHARING_UNIT}::test_a_device_is_shared_only_read_only",
            f"{SHARING_HOST}::test_device_given_writable_to_one_backend_is_refused_to_another",
        ),
    ),
    Mutant(
        "sharing: a claim whose diskseq is unknown (stock script, mounts) counts",
        SHARING,
        "return claim.diskseq is None or wanted.diskseq is None or claim.diskseq == wanted.diskseq",
        "return claim.diskseq == wanted.diskseq",
        (
            f"{SHARING_UNIT}::test_a_claim_whose_diskseq_is_unknown_counts",
            f"{SHARING_HOST}::test_stock_script_backend_without_luid_counts",
        ),
    ),
    Mutant(
        "sharing: a block device mounted on this host",
        SHARING,
        "yield from mount_claims()",
        "yield from ()",
        (f"{SHARING_HOST}::test_device_mounted_on_this_host_is_refused",),
    ),
    Mutant(
        "sharing: a block device held by dm/md (holders)",
        SHARING,
        "        if stacked:\n",
        "        if False:\n",
        (f"{SHARING_HOST}::test_device_under_a_dm_table_is_refused_writable",),
    ),
    Mutant(
        "handoff: kernel blkback opened another device",
        "xenblockctl/blockscript/handoff.py",
        "if seen != physical_device:",
        "if False:",
        ("tests/flows/test_add_remove.py::test_kernel_blkback_that_opened_another_device_fails_the_handoff",),
    ),
    Mutant(
        "owner record: leading zeros",
        "xenblockctl/xenstore/numbers.py",
        'and (text[0] != "0" or (zero and len(text) == 1))',
        "",
        (
            "tests/unit/test_blockscript_owner.py::test_leading_zeros_are_refused",
            "tests/unit/test_identity.py::test_owner_record_refuses_leading_zeros_and_other_spellings",
        ),
    ),
    Mutant(
        "loop._verify: the backing file is the one we opened",
        "xenblockctl/kernel/loop.py",
        "if (status.backing_dev, status.backing_ino) != (st.st_dev, st.st_ino):",
        "if False:",
        ("tests/kernel/test_loop.py::test_loop_bound_to_another_file_is_undone",),
    ),
    Mutant(
        "remove._withdraw: a newer owner record is left alone",
        "xenblockctl/blockscript/remove.py",
        "if recorded not in accepted:\n        tx.abort()",
        "if False:\n        tx.abort()",
        (
            "tests/flows/test_add_remove.py::test_remove_leaves_a_newer_owner_record_alone",
            "tests/flows/test_kill.py::test_remove_leaves_a_record_changed_while_it_waited_for_the_lock",
        ),
    ),
    Mutant(
        "remove: the detach waits for the AUTOCLEAR child's device lock",
        "xenblockctl/blockscript/remove.py",
        'if not isinstance(owner, OwnerRecord) or owner.kind != "loop":',
        "if True:",
        ("tests/flows/test_kill.py::test_remove_waits_for_the_autoclear_child",),
    ),
    Mutant(
        "autoclear child: AUTOCLEAR stays on unless the record is still the hand-off's",
        "xenblockctl/blockscript/autoclear.py",
        "if store.read_optional(node) != job.record:",
        "if False:",
        ("tests/flows/test_kill.py::test_autoclear_child_leaves_a_withdrawn_backend_alone",),
    ),
    Mutant(
        "open: a by-diskseq target naming a regular file",
        "xenblockctl/blockscript/claim.py",
        "if target.expect_dm_name is not None or target.expect_diskseq is not None:",
        "if target.expect_dm_name is not None:",
        ("tests/flows/test_targets.py::test_by_diskseq_link_to_a_regular_file_is_refused",),
    ),
    Mutant(
        "sharing table: a watch event marks what it names for a re-read before the next answer",
        "xenblockctl/blockscript/sharetable.py",
        '        prefix = self.root + "/"\n',
        "        return\n",
        (
            "tests/flows/test_warm_sharing.py::"
            "test_two_writable_adds_of_one_device_racing_through_workers_one_is_refused",
        ),
    ),
    Mutant(
        "claim: the post-lock identity re-check",
        "xenblockctl/blockscript/claim.py",
        "if device.identity != self.ident:",
        "if False:",
        ("tests/flows/test_add_revalidate.py::test_block_device_changed_before_the_lock_is_refused",),
    ),
)


def copy_tree(dest: Path) -> Path:
    """The package, its tests and the hotplug shim, as they are in this checkout."""
    # __pycache__ comes along: copy2 keeps the sources' mtimes, so the cached bytecode stays valid
    # for every file but the mutated one, and start-up does not recompile ~200 modules each time.
    ignore = shutil.ignore_patterns(".cache", ".pytest_cache")
    for name in ("xenblockctl", "tests", "hotplug"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore, symlinks=True)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def apply(tree: Path, mutant: Mutant) -> None:
    target = tree / mutant.path
    text = target.read_text()
    count = text.count(mutant.original)
    assert count == 1, (
        f"{mutant.path}: the rule's text occurs {count} times, expected once: {mutant.original!r}"
    )
    target.write_text(text.replace(mutant.original, mutant.mutated))


def run_tests(tree: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the development install's path entry (this checkout) must not win.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_named_tests_pass_unmutated(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    tests = tuple(dict.fromkeys(t for m in MUTANTS for t in m.tests))
    result = run_tests(tree, tests)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(tests)} passed" in result.stdout or "passed" in result.stdout, result.stdout[-2000:]
    assert "skipped" not in result.stdout, "a named test skipped: it cannot kill its mutant here"
    for m in MUTANTS:  # every row still names the code it switches off
        apply(tree, m)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_switching_off_the_rule_fails_a_named_test(tmp_path: Path, mutant: Mutant) -> None:
    tree = copy_tree(tmp_path)
    apply(tree, mutant)
    result = run_tests(tree, mutant.tests)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    survived = (
        f"mutant survived: {mutant.name} ({mutant.path})\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    )
    assert result.returncode == 1, survived
    assert any(test in line for line in failed for test in mutant.tests), survived
