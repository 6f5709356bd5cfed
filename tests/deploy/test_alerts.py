"""Alerting rules, checked by promtool (syntax and unit tests) and on a live agent.

- `promtool check rules` accepts the rule file and counts every rule.
- `promtool test rules` passes the unit tests, which show each alert firing on a sick agent
  and quiet on a healthy one; each alert is then broken twice in a temporary copy (never
  fires / always fires) to prove the unit tests notice.
- Live (`prometheus` + `root`): a real Prometheus evaluates the rules against a real agent:
  every rule evaluates without error and nothing is pending or firing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import prom_server

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "kprobe-exporter.rules.yml"
RULE_TESTS = ROOT / "alerts" / "kprobe-exporter.rules.test.yml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


ALERTS = [r["alert"] for r in load_rules() if "alert" in r]


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES), cwd=RULES.parent)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"SUCCESS: {len(load_rules())} rules found" in out, out


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_rule_metadata() -> None:
    assert len(ALERTS) == len(set(ALERTS)) >= 8
    for rule in load_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"].strip()) > 40, name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        for metric in re.findall(r"\bkprobe_\w+", rule["expr"]):
            assert metric in prom_server.CONTRACT_METRICS, (name, metric)
    required = {
        "KprobeExporterDown",
        "KprobeExporterAbsent",
        "KprobeExporterEventsLost",
        "KprobeExporterParseErrors",
        "KprobeExporterProbeNotInstalled",
        "KprobeExporterSpansDropped",
        "KprobeExporterPairsEvicted",
    }
    assert required <= set(ALERTS)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in tests:
        for check in case.get("alert_rule_test", []):
            bucket = firing if check.get("exp_alerts") else quiet
            bucket[check["alertname"]] = bucket.get(check["alertname"], 0) + 1
            for alert in check.get("exp_alerts") or []:
                assert set(alert["exp_annotations"]) == {"summary", "description"}
                assert "severity" in alert["exp_labels"]
    assert set(firing) == set(ALERTS), set(ALERTS) ^ set(firing)
    assert set(quiet) == set(ALERTS), set(ALERTS) ^ set(quiet)
    print(f"{sum(firing.values())} firing checks, {sum(quiet.values())} quiet checks, {len(tests)} test groups")


@needs_promtool
@pytest.mark.parametrize("alert", ALERTS)
@pytest.mark.parametrize("broken_expr", ["vector(1) < 0", "vector(1)"], ids=["never-fires", "always-fires"])
def test_unit_tests_notice_a_broken_rule(alert: str, broken_expr: str, tmp_path: Path) -> None:
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = broken_expr
    (tmp_path / RULES.name).write_text(yaml.safe_dump(data))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, f"unit tests still pass with {alert} broken:\n{out}"
    assert alert in out


@pytest.mark.prometheus
@pytest.mark.root
def test_rules_evaluate_quietly_against_a_live_agent(tracefs: Path) -> None:
    if not prom_server.prometheus_available():
        pytest.fail("prometheus is not installed (apt-get install prometheus)")
    if not prom_server.agent_available():
        pytest.fail("the kprobe_exporter agent does not run (python -m kprobe_exporter --help)")
    with (
        prom_server.exporter_process() as address,
        prom_server.prometheus_server([address], rule_files=[RULES]) as prom,
    ):
        prom_server.wait_for_scrapes(prom, address, samples=8, timeout=90)
        time.sleep(3)  # a few rule evaluations on the stored scrapes

        groups = prom_server.api(prom, "/api/v1/rules", {"type": "alert"})["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(ALERTS)
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            assert rule["state"] == "inactive", (rule["name"], rule["alerts"])
        assert prom_server.api(prom, "/api/v1/alerts", {})["alerts"] == []
        # The quiet is real: the series the rules watch are there, at healthy values.
        for metric in (
            "up",
            "kprobe_exporter_last_read_timestamp_seconds",
            "kprobe_exporter_probe_installed",
            "kprobe_exporter_parse_errors_total",
            "kprobe_exporter_spans_dropped_total",
            "kprobe_exporter_pairs_evicted_total",
            "kprobe_exporter_lost_events_total",
        ):
            assert prom_server.query(prom, f'{metric}{{job="kprobe-exporter"}}'), f"no {metric} series"
