"""Config: the YAML file as a validated model of probes, labels, pairings and exports.

Every user mistake becomes one errors.UserError whose line names the file, the probe and the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kprobe_exporter import yamlmodel
from kprobe_exporter.kinds import CONFIG_KEYS, RAW_KEY, parse_definition
from kprobe_exporter.yamlmodel import FileKind

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LEN = 63  # kernel MAX_EVENT_NAME_LEN (64) minus the NUL
MAX_ARGS = 128  # kernel MAX_TRACE_ARGS
PROBE_KINDS = CONFIG_KEYS  # one key per accepted kind of the table in kinds.py, then `raw`
OVERFLOW_VALUE = "__overflow__"
# Where a probe's counts and latency are kept (aggmode.py): in the kernel (hist triggers), by streaming
# every event to the agent, or `auto`: the kernel where it can express the probe, else streaming.
Aggregation = Literal["auto", "kernel", "stream"]
# Characters that would let a field end one tracefs command and start another.
_INJECTION = re.compile(r"[\n\r\x00;]|-:")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like '250ms', '10s', '2m', '1.5us'."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '10s' or '250ms'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s|m|h)?\s*", value)
        if not m:
            raise ValueError(f"{value!r} is not a duration like '10s' or '250ms'")
        scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = float(m.group(1)) * scale[m.group(2) or "s"]
    else:
        raise ValueError("expected a duration like '10s' or '250ms'")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number >= 0")
    return seconds


def default_buckets() -> list[float]:
    """Exponential latency buckets, 1 µs doubling to about 8.4 s."""
    return [1e-6 * 2**i for i in range(24)]


def check_tracefs_text(value: str) -> str:
    if _INJECTION.search(value):
        raise ValueError("must not contain a newline, ';', NUL or '-:' (it would write a second command)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpanSettings(_Strict):
    """A pair's span settings, as the config gives them and as the aggregate and the span encoder use them.

    Sampling (ratio, minimum duration) is applied by the aggregate before a pair reaches the shipper.
    """

    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    min_duration_ns: int = Field(default=0, alias="min_duration")  # written as a duration ('1ms')
    error_on_negative_retval: bool = True

    _dur = field_validator("min_duration_ns", mode="before")(lambda v: int(parse_duration(v) * 1e9))


class OtlpMetricsConfig(_Strict):
    """Push what /metrics serves over OTLP too (endpoint and protocol from OTEL_EXPORTER_OTLP_*)."""

    interval: float = Field(default=30.0, ge=1.0, le=86400.0)

    _dur = field_validator("interval", mode="before")(lambda v: parse_duration(v))


class ProbeConfig(_Strict):
    name: str | None = None
    kprobe: str | None = None
    kretprobe: str | None = None
    uprobe: str | None = None
    uretprobe: str | None = None
    tracepoint: str | None = None
    fprobe: str | None = None  # kinds.py's rows: f: (6.5), its %return, t: (6.5), e: (5.15)
    fretprobe: str | None = None
    tprobe: str | None = None
    eprobe: str | None = None
    raw: str | None = None
    args: dict[str, str] = Field(default_factory=dict)
    filter: str | None = None
    labels: list[str] = Field(default_factory=list)
    latency: bool = False
    spans: SpanSettings | None = None
    # a uprobe's binary as seen inside a container: by runtime name, or a cgroup path regexp (issue #16)
    container: str | None = None
    cgroup: str | None = None
    # kernel aggregation (aggmode.py): this probe's mode, over the top-level one; `recursive: true`
    # makes `auto` stream it (the kernel keeps one pending timestamp per thread: nested calls cannot pair)
    aggregation: Aggregation | None = None
    recursive: bool = False

    @field_validator("cgroup")
    @classmethod
    def _cgroup_regex(cls, v: str | None) -> str | None:
        try:
            re.compile(v or "")
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression: {e}") from None
        return v

    @field_validator(*CONFIG_KEYS, "filter")
    @classmethod
    def _no_injection(cls, v: str | None) -> str | None:
        if v is not None:
            check_tracefs_text(v)
            if not v.strip():
                raise ValueError("must not be empty")
        return v

    @field_validator("args")
    @classmethod
    def _args(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ARGS:
            raise ValueError(f"has {len(v)} args; the kernel takes at most {MAX_ARGS}")
        for name, fetch in v.items():
            if not NAME_RE.match(name) or len(name) > MAX_NAME_LEN:
                raise ValueError(f"arg name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if not isinstance(fetch, str) or not fetch.strip():
                raise ValueError(f"arg {name!r} needs a fetcharg such as '%di' or '+0($arg2):ustring'")
            check_tracefs_text(fetch)
            if any(c.isspace() for c in fetch):
                raise ValueError(f"arg {name!r}: a fetcharg has no spaces")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            check_name(v)
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> ProbeConfig:
        kinds = [k for k in PROBE_KINDS if getattr(self, k) is not None]
        if not kinds:
            raise ValueError(f"needs exactly one kind: one of {', '.join(PROBE_KINDS)}")
        if len(kinds) > 1:
            raise ValueError(f"has two kinds ({' and '.join(kinds)}); a probe has exactly one")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in PROBE_KINDS if getattr(self, k) is not None)

    @property
    def target(self) -> str:
        value = getattr(self, self.kind)
        assert isinstance(value, str)
        return value


class PairConfig(_Strict):
    name: str
    entry: str
    exit: str
    spans: SpanSettings | None = None

    _n = field_validator("name")(lambda v: check_name(v))


class PendingConfig(_Strict):
    max_pending: int = Field(default=65536, ge=1)
    max_age: float = 60.0

    _dur = field_validator("max_age", mode="before")(lambda v: parse_duration(v))


class CgroupRewriteRule(_Strict):
    """A cgroup path that `match` finds (re.search) becomes `replace`, with its groups (\\1, \\g<name>)."""

    match: str
    replace: str

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression: {e}") from None
        return v

    @field_validator("replace")
    @classmethod
    def _groups(cls, v: str, info: ValidationInfo) -> str:
        if "match" in info.data:  # the template is parsed up front: a bad \\3 fails here, not per event
            try:
                re.sub(info.data["match"], v, "")
            except re.error as e:
                raise ValueError(f"{v!r}: {e}") from None
        return v


class Config(_Strict):
    instance: str = "kprobe_exporter"
    buffer_size_kb: int = Field(default=4096, ge=4, le=1 << 20)
    buckets: list[float] = Field(default_factory=default_buckets)
    label_limit: int = Field(default=100, ge=1, le=100000)
    listen_address: str = "0.0.0.0:10111"
    reader: Literal["text", "raw"] = "text"
    aggregation: Aggregation = "auto"  # each probe's default; see aggmode.py
    pending: PendingConfig = Field(default_factory=PendingConfig)
    probes: list[ProbeConfig] = Field(default_factory=list)
    pairs: list[PairConfig] = Field(default_factory=list)
    otlp_metrics: OtlpMetricsConfig | None = None
    # paths to `cgroup` label values: first match wins, unmatched -> `other` (cgroups.Rewrite)
    cgroup_rewrite: list[CgroupRewriteRule] = Field(default_factory=list)

    _inst = field_validator("instance")(lambda v: check_name(v))

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one bucket")
        if any(not (b > 0 and math.isfinite(b)) for b in v) or sorted(set(v)) != v:
            raise ValueError("must be finite, positive and strictly increasing (seconds)")
        return v

    @field_validator("listen_address")
    @classmethod
    def _listen(cls, v: str) -> str:
        split_host_port(v)
        return v


def check_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(f"{v!r} must match [A-Za-z_][A-Za-z0-9_]* (letters, digits, underscore)")
    if len(v) > MAX_NAME_LEN:
        raise ValueError(f"{v[:20]!r}... is {len(v)} characters; at most {MAX_NAME_LEN}")
    return v


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def raw_event_name(line: str) -> str | None:
    """The event a raw line names, when it is a line of a kind the config takes."""
    d = parse_definition(line)
    return d.event if d is not None and d.kind is not None and d.kind.accepted else None


def _item_name(item: Any) -> str | None:
    """How messages name a probe or pair: its name, else the event its raw line names."""
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    if name is None and isinstance(item.get(RAW_KEY), str):
        name = raw_event_name(item[RAW_KEY])
    return name if isinstance(name, str) else None


CONFIG_FILE = FileKind(
    "config", top_level="the top level must be a mapping with 'probes:', not {type}",
    empty="the file is empty; it needs at least 'probes:'", mapping_hint="name, uprobe, args",
    max_bytes=4 << 20, sections={"probes": "probe", "pairs": "pair"}, item_name=_item_name)


def load_text(text: str, path: str = "<config>") -> Config:
    return yamlmodel.load_text(Config, text, path, CONFIG_FILE)


def load(path: str | Path) -> Config:
    return yamlmodel.load_file(Config, Path(path), CONFIG_FILE)
