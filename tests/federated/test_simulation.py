"""Real Flower simulations (Ray on loopback) through the command: the issue's checks.

- 20% backdoor clients on the bundled digits: FedAvg's ASR > 80%, and a robust aggregator
  (MultiKrum) keeps it below 10% with accuracy within 3 points of the no-attack run.
- Central DP: the epsilon the run reports after every round equals an independent
  accountant's (dp-accounting) for the same q, sigma, rounds and delta.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelshield.report import validate_report
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import run_cli

pytest.importorskip("flwr")
pytest.importorskip("ray")


def fl(*args: str) -> object:
    return run_cli("fl", *args, timeout=600)


@pytest.fixture(scope="module")
def backdoor_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("fl") / "backdoor"
    args = [
        "simulate", "--clients", "10", "--rounds", "8", "--malicious", "0.2", "--attack", "backdoor",
        "--compare", "fedavg,multi-krum", "--cpus", "2", "--out", str(out),
    ]  # fmt: skip
    r = fl(*args)
    assert r.returncode == 0, r.stderr[-3000:]  # type: ignore[attr-defined]
    return out, args


def test_backdoor_beats_fedavg_and_multikrum_stops_it(backdoor_run: tuple[Path, list[str]]) -> None:
    out, _ = backdoor_run
    res = json.loads((out / "result.json").read_text())
    final = res["comparison"]
    assert final["fedavg"]["asr"] > 0.8
    assert final["multi-krum"]["asr"] < 0.1
    assert final["multi-krum"]["accuracy"] >= final["no-attack"]["accuracy"] - 0.03
    for run in res["runs"].values():
        assert [r["round"] for r in run["rounds"]] == list(range(9))
    assert len(res["accuracy"]) == len(res["asr"]) == 9
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    names = {p["probe"] for p in report["probes"]}
    assert names == {"fl-no-attack", "fl-fedavg", "fl-multi-krum", "fl-comparison"}


def test_a_rerun_reuses_the_finished_runs(backdoor_run: tuple[Path, list[str]]) -> None:
    out, args = backdoor_run
    before = json.loads((out / "result.json").read_text())
    r = fl(*args)
    assert r.returncode == 0, r.stderr[-3000:]  # type: ignore[attr-defined]
    after = json.loads((out / "result.json").read_text())
    assert sorted(after["reused"]) == ["fedavg", "multi-krum", "no-attack"]
    assert after["comparison"] == before["comparison"]


def test_central_dp_epsilon_matches_dp_accounting(tmp_path: Path) -> None:
    dpa = pytest.importorskip("dp_accounting")
    q, sigma, rounds, delta = 0.5, 1.2, 3, 1e-5
    out = tmp_path / "dp"
    r = fl(
        "simulate", "--clients", "6", "--rounds", str(rounds), "--fraction", str(q), "--dp", "central",
        "--noise-multiplier", str(sigma), "--clip", "1.0", "--delta", str(delta), "--cpus", "2",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]  # type: ignore[attr-defined]
    res = json.loads((out / "result.json").read_text())
    eps = res["epsilon"]
    assert eps[0] is None and len(eps) == rounds + 1
    for t in range(1, rounds + 1):
        event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), t)
        pld = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
        pld.compose(event)
        rdp = dpa.rdp.RdpAccountant()
        rdp.compose(event)
        want = pld.get_epsilon(delta)
        assert eps[t] == pytest.approx(want, rel=0.02, abs=0.02), (t, eps[t], want)
        assert eps[t] <= rdp.get_epsilon(delta) + 1e-9  # PRV/PLD is tighter than RDP
        ours_rdp = res["runs"]["fedavg"]["rounds"][t]["epsilon_rdp"]
        assert ours_rdp == pytest.approx(rdp.get_epsilon(delta), rel=0.01)
    assert res["dp"]["epsilon"] == eps[-1] and res["dp"]["sample_rate"] == q
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    plots = report["probes"][0]["plots"]
    assert [p["title"].split(" (")[0] for p in plots][-1] == "Client-level epsilon"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--malicious", "0.2"], ["--attack"]),
        (["--secagg", "--aggregator", "krum"], ["--secagg"]),
        (["--dp", "central", "--noise-multiplier", "1", "--aggregator", "median"], ["DP-FedAvg"]),
        (["--dp", "central", "--noise-multiplier", "0.5", "--max-epsilon", "1"], ["--max-epsilon"]),
        (["--data", "no-such-file.npz"], ["no-such-file"]),
        (["--compare", "fedavg,krumm"], ["krumm"]),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_engine_starts(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    r = fl("simulate", "--clients", "5", "--rounds", "2", *args, "--out", str(tmp_path / "o"))
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "o" / "result.json").exists()
