"""``modelshield fl run``: a real SuperLink and SuperNodes over gRPC on 127.0.0.1, through the
command, leaving no Flower process behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import assert_one_line_error
from tests.conftest import run_cli

pytest.importorskip("flwr")

FLOWER = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
)


def _flower_processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            state = next(
                (
                    ln
                    for ln in (proc / "status").read_text().splitlines()
                    if ln.startswith("State:")
                ),
                "",
            )
        except OSError:
            continue
        if "Z" not in state and any(name in cmd for name in FLOWER):
            found.append(cmd)
    return found


def test_fl_run_trains_across_real_processes_and_cleans_up(tmp_path: Path) -> None:
    assert not _flower_processes()
    out = tmp_path / "deploy"
    r = run_cli(
        "fl", "run", "--clients", "2", "--rounds", "2", "--malicious", "0.5", "--attack", "sign-flip",
        "--aggregator", "median", "--out", str(out), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["mode"] == "deployment"
    assert [row["round"] for row in res["rounds"]] == [0, 1, 2]
    run_dir = out / "runs" / "median"
    assert (run_dir / "logs" / "superlink.log").exists()
    assert len(list((run_dir / "logs").glob("supernode-*.log"))) == 2
    assert not _flower_processes()


def test_fl_run_refuses_bad_settings_before_starting_anything(tmp_path: Path) -> None:
    r = run_cli(
        "fl",
        "run",
        "--clients",
        "2",
        "--secagg",
        "--aggregator",
        "krum",
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(r, "--secagg")
    assert not _flower_processes()
