"""The Grafana dashboard and provisioning files.

(a) Lint: the rules grafana/dashboard-linter enforces (template-datasource-rule,
    template-job-rule, template-instance-rule, template-label-promql-rule,
    template-on-time-change-reload, panel-datasource-rule, panel-title-description-rule,
    panel-units-rule, panel-no-targets-rule, target-promql-rule, target-rate-interval-rule,
    target-job-rule, target-instance-rule, target-counter-agg-rule, uneditable-dashboard-rule),
    re-implemented here on a small PromQL parser, some of them stricter than the original:
    every range is $__rate_interval, and histogram _bucket/_sum/_count series count as
    counters too. Every query is also checked by the real PromQL parser (`promtool check
    rules`), and every metric it names must be one the agent exports.
(b) Live (`prometheus` + `root` markers): a real Prometheus scrapes a real agent, and every
    panel query and template-variable query returns data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import prom_server

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "kprobe-exporter.json"
PROVISIONING = ROOT / "grafana" / "provisioning"

# Metric names of the agent's contract, plus the two series Prometheus itself adds.
AGENT_METRICS = prom_server.CONTRACT_METRICS
SCRAPE_METRICS = {"up", "scrape_duration_seconds"}
COUNTER_SUFFIXES = ("_total", "_bucket", "_sum", "_count")

# Grafana unit ids (packages/grafana-data/src/valueFormats/categories.ts), the ones an
# exporter dashboard can sensibly use; the linter accepts these and more.
VALID_UNITS = {
    "none",
    "string",
    "short",
    "percent",
    "percentunit",
    "sci",
    "locale",
    "hex",
    "hex0x",
    "bytes",
    "decbytes",
    "bits",
    "decbits",
    "kbytes",
    "mbytes",
    "gbytes",
    "pps",
    "binBps",
    "Bps",
    "binbps",
    "bps",
    "dateTimeAsIso",
    "dateTimeFromNow",
    "dateTimeAsSystem",
    "hertz",
    "ns",
    "µs",
    "ms",
    "s",
    "m",
    "h",
    "d",
    "dtdurationms",
    "dtdurations",
    "dthms",
    "cps",
    "ops",
    "reqps",
    "rps",
    "wps",
    "iops",
    "cpm",
    "opm",
    "rpm",
    "wpm",
    "bool",
    "bool_yes_no",
    "bool_on_off",
}
QUERY_PANEL_TYPES = {
    "timeseries",
    "stat",
    "gauge",
    "table",
    "heatmap",
    "bargauge",
    "graph",
    "singlestat",
    "state-timeline",
    "status-history",
    "histogram",
    "piechart",
}


# --------------------------------------------------------------------------- PromQL parser
# Enough PromQL for dashboards and alert rules: selectors, ranges, subqueries, offset/@,
# functions, aggregations with by/without and parameters, binary operators with
# bool/on/ignoring/group_left/group_right, unary minus, numbers, strings, and Grafana
# variables ($var, ${var}) standing for durations or values.

AGGREGATIONS = {
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
}
BINARY_PRECEDENCE = {
    "or": 1,
    "and": 2,
    "unless": 2,
    "==": 3,
    "!=": 3,
    ">": 3,
    "<": 3,
    ">=": 3,
    "<=": 3,
    "+": 4,
    "-": 4,
    "*": 5,
    "/": 5,
    "%": 5,
    "atan2": 5,
    "^": 6,
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
}

TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+)(?![\w.])
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[Ii]nf|NaN)(?![\w])
  | (?P<variable>\$\{[^}]+\}|\$\w+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],:@])
""",
    re.VERBOSE,
)


class PromQLError(ValueError):
    pass


@dataclass
class Node:
    def children(self) -> list[Node]:
        return []


@dataclass
class VectorSelector(Node):
    name: str | None
    matchers: list[tuple[str, str, str]]


@dataclass
class MatrixSelector(Node):
    vector: VectorSelector
    range: str

    def children(self) -> list[Node]:
        return [self.vector]


@dataclass
class Subquery(Node):
    expr: Node
    range: str
    step: str | None

    def children(self) -> list[Node]:
        return [self.expr]


@dataclass
class Call(Node):
    func: str
    args: list[Node]

    def children(self) -> list[Node]:
        return list(self.args)


@dataclass
class Aggregate(Node):
    op: str
    expr: Node
    param: Node | None
    grouping: tuple[str, list[str]] | None

    def children(self) -> list[Node]:
        return ([self.param] if self.param is not None else []) + [self.expr]


@dataclass
class Binary(Node):
    op: str
    lhs: Node
    rhs: Node

    def children(self) -> list[Node]:
        return [self.lhs, self.rhs]


@dataclass
class Unary(Node):
    op: str
    expr: Node

    def children(self) -> list[Node]:
        return [self.expr]


@dataclass
class Paren(Node):
    expr: Node

    def children(self) -> list[Node]:
        return [self.expr]


@dataclass
class Literal(Node):
    value: str


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


def tokenize(expr: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        if not m:
            raise PromQLError(f"unexpected character {expr[pos]!r} at {pos} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    tokens.append(_Tok("eof", "", pos))
    return tokens


@dataclass
class Parser:
    expr: str
    tokens: list[_Tok] = field(default_factory=list)
    i: int = 0

    def __post_init__(self) -> None:
        self.tokens = tokenize(self.expr)

    def peek(self, offset: int = 0) -> _Tok:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def next(self) -> _Tok:
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, text: str) -> _Tok:
        tok = self.next()
        if tok.text != text:
            raise PromQLError(f"expected {text!r}, got {tok.text!r} at {tok.pos} in {self.expr!r}")
        return tok

    def parse(self) -> Node:
        node = self.parse_binary(0)
        if self.peek().kind != "eof":
            raise PromQLError(f"unexpected {self.peek().text!r} at {self.peek().pos} in {self.expr!r}")
        return node

    def binary_op(self) -> str | None:
        tok = self.peek()
        if tok.kind in ("op", "ident") and tok.text in BINARY_PRECEDENCE:
            return tok.text
        return None

    def parse_binary(self, min_prec: int) -> Node:
        lhs = self.parse_unary()
        while True:
            op = self.binary_op()
            if op is None or BINARY_PRECEDENCE[op] < min_prec:
                return lhs
            self.next()
            if self.peek().text == "bool":
                self.next()
            if self.peek().text in ("on", "ignoring"):
                self.next()
                self.label_list()
            if self.peek().text in ("group_left", "group_right"):
                self.next()
                if self.peek().text == "(":
                    self.label_list()
            prec = BINARY_PRECEDENCE[op]
            rhs = self.parse_binary(prec if op == "^" else prec + 1)
            lhs = Binary(op, lhs, rhs)

    def parse_unary(self) -> Node:
        if self.peek().text in ("-", "+"):
            op = self.next().text
            return Unary(op, self.parse_binary(BINARY_PRECEDENCE["^"]))
        return self.parse_postfix(self.parse_primary())

    def label_list(self) -> list[str]:
        self.expect("(")
        labels: list[str] = []
        while self.peek().text != ")":
            tok = self.next()
            if tok.kind not in ("ident", "string"):
                raise PromQLError(f"bad label {tok.text!r} in {self.expr!r}")
            labels.append(tok.text)
            if self.peek().text == ",":
                self.next()
        self.expect(")")
        return labels

    def duration(self) -> str:
        tok = self.next()
        if tok.kind not in ("duration", "variable", "number"):
            raise PromQLError(f"bad duration {tok.text!r} in {self.expr!r}")
        return tok.text

    def parse_postfix(self, node: Node) -> Node:
        while True:
            tok = self.peek()
            if tok.text == "[":
                self.next()
                rng = self.duration()
                if self.peek().text == ":":
                    self.next()
                    step = self.duration() if self.peek().text != "]" else None
                    self.expect("]")
                    node = Subquery(node, rng, step)
                else:
                    self.expect("]")
                    if not isinstance(node, VectorSelector):
                        raise PromQLError(f"range on a non-selector in {self.expr!r}")
                    node = MatrixSelector(node, rng)
            elif tok.text == "offset":
                self.next()
                if self.peek().text == "-":
                    self.next()
                self.duration()
            elif tok.text == "@":
                self.next()
                arg = self.next()
                if arg.text in ("start", "end"):
                    self.expect("(")
                    self.expect(")")
                elif arg.kind not in ("number", "variable"):
                    raise PromQLError(f"bad @ modifier in {self.expr!r}")
            else:
                return node

    def parse_primary(self) -> Node:
        tok = self.peek()
        if tok.text == "(":
            self.next()
            inner = self.parse_binary(0)
            self.expect(")")
            return Paren(inner)
        if tok.kind in ("number", "string", "variable"):
            self.next()
            return Literal(tok.text)
        if tok.text == "{":
            return self.selector(None)
        if tok.kind == "ident":
            if tok.text in AGGREGATIONS and self.peek(1).text in ("(", "by", "without"):
                return self.aggregation()
            if self.peek(1).text == "(":
                name = self.next().text
                self.expect("(")
                args: list[Node] = []
                while self.peek().text != ")":
                    args.append(self.parse_binary(0))
                    if self.peek().text == ",":
                        self.next()
                    elif self.peek().text != ")":
                        raise PromQLError(f"bad argument list of {name} in {self.expr!r}")
                self.expect(")")
                return Call(name, args)
            if tok.text in KEYWORDS:
                raise PromQLError(f"unexpected keyword {tok.text!r} in {self.expr!r}")
            self.next()
            return self.selector(tok.text)
        raise PromQLError(f"unexpected {tok.text!r} at {tok.pos} in {self.expr!r}")

    def selector(self, name: str | None) -> VectorSelector:
        matchers: list[tuple[str, str, str]] = []
        if self.peek().text == "{":
            self.next()
            while self.peek().text != "}":
                label = self.next()
                op = self.next()
                value = self.next()
                if label.kind != "ident" or op.text not in ("=", "!=", "=~", "!~") or value.kind != "string":
                    raise PromQLError(f"bad matcher near {label.text!r} in {self.expr!r}")
                matchers.append((label.text, op.text, value.text[1:-1]))
                if self.peek().text == ",":
                    self.next()
                elif self.peek().text != "}":
                    raise PromQLError(f"bad matcher list in {self.expr!r}")
            self.expect("}")
        if name is None and not matchers:
            raise PromQLError(f"empty selector in {self.expr!r}")
        return VectorSelector(name, matchers)

    def aggregation(self) -> Aggregate:
        op = self.next().text
        grouping: tuple[str, list[str]] | None = None
        if self.peek().text in ("by", "without"):
            kind = self.next().text
            grouping = (kind, self.label_list())
        self.expect("(")
        first = self.parse_binary(0)
        param: Node | None = None
        if self.peek().text == ",":
            self.next()
            param, first = first, self.parse_binary(0)
        self.expect(")")
        if self.peek().text in ("by", "without"):
            kind = self.next().text
            grouping = (kind, self.label_list())
        return Aggregate(op, first, param, grouping)


def parse_promql(expr: str) -> Node:
    return Parser(expr).parse()


def walk(node: Node, parents: tuple[Node, ...] = ()) -> Iterator[tuple[Node, tuple[Node, ...]]]:
    yield node, parents
    for child in node.children():
        yield from walk(child, (*parents, node))


def selectors(node: Node) -> list[VectorSelector]:
    return [n for n, _ in walk(node) if isinstance(n, VectorSelector)]


def metric_name(sel: VectorSelector) -> str | None:
    if sel.name:
        return sel.name
    for label, op, value in sel.matchers:
        if label == "__name__" and op == "=":
            return value
    return None


# --------------------------------------------------------------------------- lint rules


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def templates(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


def template_query(t: dict[str, Any]) -> str:
    q = t.get("query", "")
    return str(q.get("query", "")) if isinstance(q, dict) else str(q)


def datasource_uid(ds: Any) -> str:
    if isinstance(ds, dict):
        return str(ds.get("uid", ""))
    return str(ds or "")


def lint(dashboard: dict[str, Any]) -> list[str]:
    """Return one message per violation, prefixed by the dashboard-linter rule name."""
    errors: list[str] = []
    temps = templates(dashboard)
    by_name = {t.get("name"): t for t in temps}

    # template-datasource-rule
    ds_templates = [t for t in temps if t.get("type") == "datasource"]
    if not ds_templates:
        errors.append("template-datasource-rule: no templated data source")
    for t in ds_templates:
        query = template_query(t)
        allowed_names = {f"{query.lower()}_datasource"}
        allowed_labels = {f"{query.title()} data source"}
        if len(ds_templates) == 1:
            allowed_names.add("datasource")
            allowed_labels.add("Data source")
        if t.get("name") not in allowed_names:
            errors.append(
                f"template-datasource-rule: variable {t.get('name')!r} should be one of {sorted(allowed_names)}"
            )
        if t.get("label") not in allowed_labels:
            errors.append(
                f"template-datasource-rule: variable {t.get('name')!r} label "
                f"{t.get('label')!r} should be one of {sorted(allowed_labels)}"
            )
    first_ds = ds_templates[0] if ds_templates else None
    prometheus_dashboard = first_ds is not None and template_query(first_ds) == "prometheus"
    if not prometheus_dashboard:
        errors.append("template-datasource-rule: the first data source variable must be prometheus")
    prom_ds_refs = {"$datasource", "${datasource}", "$prometheus_datasource", "${prometheus_datasource}"}
    ds_refs = {ref for t in ds_templates for ref in (f"${t['name']}", f"${{{t['name']}}}")}

    # template-job-rule, template-instance-rule (checkTemplate), plus includeAll
    for name in ("job", "instance"):
        found = by_name.get(name)
        rule = f"template-{name}-rule"
        if found is None:
            errors.append(f"{rule}: missing the {name} template")
            continue
        t = found
        if datasource_uid(t.get("datasource")) not in prom_ds_refs:
            errors.append(f"{rule}: {name} template should use the templated prometheus data source")
        if t.get("type") != "query":
            errors.append(f"{rule}: {name} template should be a Prometheus query")
        if t.get("label") != name.title():
            errors.append(f"{rule}: {name} template should be labeled {name.title()!r}")
        if not t.get("multi"):
            errors.append(f"{rule}: {name} template should be a multi select")
        if not t.get("includeAll"):
            errors.append(f"{rule}: {name} template should include All")
        if t.get("allValue") != ".+":
            errors.append(f"{rule}: {name} template allValue should be '.+'")

    # template-label-promql-rule, template-on-time-change-reload
    for t in temps:
        if t.get("type") != "query":
            continue
        q = template_query(t)
        m = re.search(r"([a-z_]+)\((.+)\)", q)
        if not m or m.group(1) not in ("label_names", "label_values", "metrics", "query_result"):
            errors.append(f"template-label-promql-rule: {t.get('name')}: invalid query {q!r}")
        else:
            arg = m.group(2)
            if m.group(1) == "label_values" and "," in arg:
                arg, _, label = arg.rpartition(",")
                if not re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", label):
                    errors.append(f"template-label-promql-rule: {t.get('name')}: bad label {label!r}")
            try:
                parse_promql(arg)
            except PromQLError as err:
                errors.append(f"template-label-promql-rule: {t.get('name')}: {err}")
        if t.get("refresh") != 2:
            errors.append(f"template-on-time-change-reload: {t.get('name')} should refresh on time change")

    if dashboard.get("editable", True):
        errors.append("uneditable-dashboard-rule: dashboard should set editable: false")

    for panel in query_panels(dashboard):
        title = panel.get("title", "")
        where = f"panel {panel.get('id')} {title!r}"
        # panel-datasource-rule
        if datasource_uid(panel.get("datasource")) not in ds_refs:
            errors.append(f"panel-datasource-rule: {where} does not use a templated data source")
        # panel-title-description-rule
        if not title or not panel.get("description"):
            errors.append(f"panel-title-description-rule: {where} lacks a title or description")
        # panel-units-rule (for every panel type here, not only the linter's list)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if unit not in VALID_UNITS:
            errors.append(f"panel-units-rule: {where} has no or invalid unit {unit!r}")
        # panel-no-targets-rule
        targets = panel.get("targets", [])
        if panel.get("type") in QUERY_PANEL_TYPES and not targets:
            errors.append(f"panel-no-targets-rule: {where} has no targets")
        for target in targets:
            expr = target.get("expr", "")
            tw = f"{where} target {target.get('refId')}"
            if datasource_uid(target.get("datasource", panel.get("datasource"))) not in ds_refs:
                errors.append(f"panel-datasource-rule: {tw} does not use a templated data source")
            try:
                node = parse_promql(expr)
            except PromQLError as err:
                errors.append(f"target-promql-rule: {tw}: {err}")
                continue
            for n, parents in walk(node):
                # target-rate-interval-rule (strict: every range is $__rate_interval)
                if isinstance(n, MatrixSelector | Subquery) and n.range not in (
                    "$__rate_interval",
                    "${__rate_interval}",
                ):
                    errors.append(f"target-rate-interval-rule: {tw}: range {n.range} in {expr!r}")
                if not isinstance(n, VectorSelector):
                    continue
                name = metric_name(n) or ""
                # target-job-rule, target-instance-rule
                for label in ("job", "instance"):
                    if (label, "=~", f"${label}") not in n.matchers:
                        errors.append(
                            f'target-{label}-rule: {tw}: selector {name} lacks {label}=~"${label}" in {expr!r}'
                        )
                # target-counter-agg-rule (counters and histogram series)
                if name.endswith(COUNTER_SUFFIXES):
                    ok = (
                        len(parents) >= 2
                        and isinstance(parents[-1], MatrixSelector)
                        and isinstance(parents[-2], Call)
                        and parents[-2].func in ("rate", "irate", "increase")
                    )
                    if not ok:
                        errors.append(
                            f"target-counter-agg-rule: {tw}: counter {name} is not inside "
                            f"rate/irate/increase in {expr!r}"
                        )
    return errors


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in query_panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_passes_lint(dashboard: dict[str, Any]) -> None:
    errors = lint(dashboard)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("mutation", "rule"),
    [
        (lambda d: d["templating"]["list"][0].update(name="datasource"), "template-datasource-rule"),
        (lambda d: d["templating"]["list"].pop(2), "template-job-rule"),
        (lambda d: d["templating"]["list"][3].update(allValue=".*"), "template-instance-rule"),
        (
            lambda d: d["templating"]["list"][4].update(query="labels(kprobe_exporter_probe_info)"),
            "template-label-promql-rule",
        ),
        (lambda d: d["templating"]["list"][4].update(refresh=1), "template-on-time-change-reload"),
        (lambda d: query_panels(d)[2].update(datasource={"type": "prometheus", "uid": "abc"}), "panel-datasource-rule"),
        (lambda d: query_panels(d)[3].update(description=""), "panel-title-description-rule"),
        (lambda d: query_panels(d)[4]["fieldConfig"]["defaults"].update(unit="events"), "panel-units-rule"),
        (lambda d: query_panels(d)[4].update(targets=[]), "panel-no-targets-rule"),
        (
            lambda d: query_panels(d)[6]["targets"][0].update(
                expr=query_panels(d)[6]["targets"][0]["expr"].replace("$__rate_interval", "5m")
            ),
            "target-rate-interval-rule",
        ),
        (
            lambda d: query_panels(d)[6]["targets"][0].update(
                expr=query_panels(d)[6]["targets"][0]["expr"].replace('job=~"$job", ', "")
            ),
            "target-job-rule",
        ),
        (
            lambda d: query_panels(d)[6]["targets"][0].update(
                expr=query_panels(d)[6]["targets"][0]["expr"].replace('instance=~"$instance"', 'instance!=""')
            ),
            "target-instance-rule",
        ),
        (
            lambda d: query_panels(d)[6]["targets"][0].update(
                expr='sum(kprobe_events_total{job=~"$job", instance=~"$instance"})'
            ),
            "target-counter-agg-rule",
        ),
        (
            lambda d: query_panels(d)[6]["targets"][0].update(
                expr='sum(rate(kprobe_events_total{job=~"$job", instance=~"$instance"}[$__rate_interval])'
            ),
            "target-promql-rule",
        ),
        (lambda d: d.update(editable=True), "uneditable-dashboard-rule"),
    ],
)
def test_lint_catches_violation(dashboard: dict[str, Any], mutation: Any, rule: str) -> None:
    broken = json.loads(json.dumps(dashboard))
    mutation(broken)
    errors = lint(broken)
    assert any(e.startswith(rule + ":") for e in errors), errors


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    temps = {t["name"]: t for t in templates(dashboard)}
    assert temps["prometheus_datasource"]["type"] == "datasource"
    assert temps["prometheus_datasource"]["query"] == "prometheus"
    assert temps["tempo_datasource"]["type"] == "datasource"
    assert temps["tempo_datasource"]["query"] == "tempo"
    probe = temps["probe"]
    assert probe["multi"] and probe["includeAll"] and probe["allValue"] == ".+"
    panels = query_panels(dashboard)
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in all_panels(dashboard)]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    exprs = [t["expr"] for _, t in all_targets(dashboard)]
    # every panel group the dashboard promises
    for needle in (
        "kprobe_events_total",
        "kprobe_latency_seconds_bucket",
        "histogram_quantile(0.5",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99",
        "topk(",
        "kprobe_exporter_lost_events_total",
        "kprobe_exporter_parse_errors_total",
        "kprobe_exporter_pairs_unmatched_total",
        "kprobe_exporter_pairs_evicted_total",
        "kprobe_exporter_label_overflow_total",
        "kprobe_exporter_spans_exported_total",
        "kprobe_exporter_spans_dropped_total",
        "kprobe_exporter_probe_installed",
    ):
        assert any(needle in e for e in exprs), f"no panel queries {needle}"
    # latency heatmap from classic buckets, repeated per probe, with exemplars
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0].get("repeat") == "probe"
    for h in heatmaps:
        assert h["options"]["calculate"] is False
        assert h["options"]["yAxis"]["unit"] == "s"
        for t in h["targets"]:
            assert t["format"] == "heatmap" and "_bucket" in t["expr"] and t.get("exemplar") is True
    # exemplars on every latency panel built from buckets
    for p in panels:
        if any("kprobe_latency_seconds_bucket" in t["expr"] for t in p["targets"]) and not any(
            t.get("instant") for t in p["targets"]
        ):
            assert any(t.get("exemplar") for t in p["targets"]), p["title"]
    # the tracing data source variable is used somewhere (panel links to Tempo)
    assert "${tempo_datasource}" in json.dumps(dashboard)
    # every metric named is one the agent (or Prometheus' scrape) produces
    for _, t in all_targets(dashboard):
        for sel in selectors(parse_promql(t["expr"])):
            assert metric_name(sel) in AGENT_METRICS | SCRAPE_METRICS, (metric_name(sel), t["expr"])
    for t in templates(dashboard):
        if t["type"] == "query":
            m = re.search(r"\((\w+)", template_query(t))
            assert m and m.group(1) in AGENT_METRICS, template_query(t)


def substitute(
    expr: str, *, job: str = ".+", instance: str = ".+", probe: str = ".+", rate_interval: str = "1m"
) -> str:
    out = expr
    for name, value in (
        ("__rate_interval", rate_interval),
        ("__interval", "15s"),
        ("__range", "1h"),
        ("job", job),
        ("instance", instance),
        ("probe", probe),
    ):
        out = out.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in out, out
    return out


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_query_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """The real PromQL parser accepts every panel and variable query."""
    exprs = [substitute(t["expr"]) for _, t in all_targets(dashboard)]
    for t in templates(dashboard):
        if t["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", template_query(t))
            assert m, template_query(t)
            exprs.append(substitute(m.group(1)))
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout + result.stderr


def test_promql_parser_rejects_garbage() -> None:
    for bad in ("sum(", "rate(x[5m]", "x{job=}", 'x{job=~"a"', "sum by (a (x)", "1 +", "x[5m][1m]"):
        with pytest.raises(PromQLError):
            parse_promql(bad)
    node = parse_promql(
        'sum by (probe) (rate(a_total{job=~"$job"}[$__rate_interval])) / on (x) group_left (y) b offset 5m'
    )
    names = [metric_name(s) for s in selectors(node)]
    assert names == ["a_total", "b"]


def test_provisioning_files() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "kprobe-exporter.yaml").read_text())
    assert provider["apiVersion"] == 1
    [entry] = provider["providers"]
    assert entry["type"] == "file"
    path = Path(entry["options"]["path"])
    assert path.is_absolute()
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "kprobe-exporter.yaml").read_text())
    by_type = {d["type"]: d for d in datasources["datasources"]}
    prom, tempo = by_type["prometheus"], by_type["tempo"]
    # Exemplars on the latency panels link to the tracing data source by the trace_id label.
    [dest] = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert dest["name"] == "trace_id" and dest["datasourceUid"] == tempo["uid"]


# --------------------------------------------------------------------------- live

LIVE_CONFIG = """
instance: kpe_t_grafana
label_limit: 1
probes:
  # the embedded default's syscall tracepoint pairs
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    latency: true
  - name: read
    tracepoint: syscalls/sys_enter_read
    latency: true
  - name: write
    tracepoint: syscalls/sys_enter_write
    latency: true
  # a uprobe pair (uprobe_profile gives hits/misses), a capped label (overflow) and spans
  # (exemplars with trace_id on the latency buckets)
  - name: open_path
    uprobe: {fxgen}:open_path
    args: {{path: "+0(%di):string"}}
    labels: [path]
    latency: true
    spans: {{sample_ratio: 1.0}}
"""


TRACEPOINT_ABSENT = (
    "kprobe_exporter_probe_hits_total",
    "kprobe_exporter_probe_misses_total",
    "kprobe_exporter_label_overflow_total",
)


def _activity(stop: threading.Event, directory: Path, fxgen: Path) -> None:
    """openat/read/write syscalls for the tracepoint pairs, and open_path calls on two paths
    (label_limit 1, so the second overflows)."""
    path = directory / "activity.bin"
    payload = b"x" * 512
    while not stop.is_set():
        for _ in range(200):
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
            os.write(fd, payload)
            os.lseek(fd, 0, os.SEEK_SET)
            os.read(fd, len(payload))
            os.close(fd)
        for target in ("/etc/hostname", "/etc/passwd"):
            subprocess.run([str(fxgen), "open", "20", target], check=True)
        stop.wait(0.2)


@dataclass
class LiveStack:
    prom: str
    address: str
    receiver: Any


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory, tracefs: Path, progs: dict[str, Path]) -> Iterator[LiveStack]:
    """A real agent (LIVE_CONFIG, spans to a real OTLP receiver), a real Prometheus scraping
    it every second, and a thread making the probed calls; ready after 12 scrapes."""
    if not prom_server.prometheus_available():
        pytest.fail("prometheus is not installed (apt-get install prometheus)")
    from otlp_receiver import GrpcReceiver

    workdir = tmp_path_factory.mktemp("grafana-live")
    config = workdir / "config.yaml"
    config.write_text(LIVE_CONFIG.format(fxgen=progs["pie"]))
    stop = threading.Event()
    worker = threading.Thread(target=_activity, args=(stop, workdir, progs["pie"]), daemon=True)
    with (
        GrpcReceiver() as receiver,
        prom_server.exporter_process(config=config, env=receiver.env()) as address,
        prom_server.prometheus_server([address], scrape_interval="1s") as prom,
    ):
        worker.start()
        try:
            prom_server.wait_for_scrapes(prom, address, samples=12, timeout=90)
            yield LiveStack(prom, address, receiver)
        finally:
            stop.set()
            worker.join(timeout=30)


@pytest.mark.prometheus
@pytest.mark.root
def test_every_panel_query_returns_data_from_live_agent(dashboard: dict[str, Any], live_stack: LiveStack) -> None:
    """A real Prometheus scrapes a real agent; every panel and variable query has data."""
    prom, address = live_stack.prom, live_stack.address
    # Variables: job, instance and probe values come from the agent's own series.
    jobs = prom_server.label_values(prom, "job", "kprobe_exporter_build_info")
    instances = prom_server.label_values(prom, "instance", "kprobe_exporter_build_info")
    probes = prom_server.label_values(prom, "probe", "kprobe_exporter_probe_info")
    assert jobs == ["kprobe-exporter"] and instances == [address], (jobs, instances)
    assert {"openat", "read", "write", "open_path"} <= set(probes), probes
    empty: list[str] = []
    checked = 0
    # $probe = All (the dashboard's default), then one probe of each kind. A syscall
    # tracepoint has no kernel profile (no hits/misses) and, having no labels, no
    # label-overflow series: only those may be empty for it.
    for probe in (".+", "open_path", "openat"):
        for panel, target in all_targets(dashboard):
            expr = substitute(target["expr"], probe=probe, rate_interval="10s")
            result = prom_server.query(prom, expr)
            checked += 1
            if result:
                continue
            if probe == "openat" and any(m in expr for m in TRACEPOINT_ABSENT):
                continue
            empty.append(f"{panel['title']} [{target['refId']}] probe={probe}: {expr}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    print(f"{checked} panel queries returned data")
    # The values that matter are alive, not just present.
    for probe in ("openat", "open_path"):
        sel = f'job=~".+", instance=~".+", probe="{probe}"'
        rate = prom_server.query(prom, f"sum(rate(kprobe_events_total{{{sel}}}[10s]))")
        assert float(rate[0]["value"][1]) > 0, probe
        p99 = prom_server.query(
            prom, f"histogram_quantile(0.99, sum by (le) (rate(kprobe_latency_seconds_bucket{{{sel}}}[10s])))"
        )
        assert 0 < float(p99[0]["value"][1]) < 10, probe
    installed = prom_server.query(prom, "min(kprobe_exporter_probe_installed)")
    assert float(installed[0]["value"][1]) == 1
    overflow = prom_server.query(prom, 'sum(kprobe_exporter_label_overflow_total{probe="open_path"})')
    assert float(overflow[0]["value"][1]) > 0


@pytest.mark.prometheus
@pytest.mark.root
@pytest.mark.otlp
def test_latency_exemplars_link_to_exported_spans(live_stack: LiveStack) -> None:
    """Exemplars on the latency buckets carry trace ids of spans the OTLP receiver got: the
    link the latency panels follow into the tracing data source (trace_id destination)."""
    prom = live_stack.prom
    trace_ids: set[str] = set()

    def stored() -> bool:
        now = time.time()
        data = prom_server.api(
            prom,
            "/api/v1/query_exemplars",
            {
                "query": 'kprobe_latency_seconds_bucket{probe="open_path"}',
                "start": f"{now - 300:.3f}",
                "end": f"{now + 5:.3f}",
            },
        )
        trace_ids.update(
            e["labels"]["trace_id"] for series in data for e in series["exemplars"] if "trace_id" in e["labels"]
        )
        return bool(trace_ids)

    prom_server.wait_until(stored, timeout=30, interval=1, what="exemplars with trace_id in Prometheus")
    received = {s.trace_id for s in live_stack.receiver.spans}
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids), trace_ids
    assert trace_ids & received, (sorted(trace_ids)[:3], len(received))
