"""Unit tests of what the kernel lab (tests/lab/test_kernel_lab.py) found on Debian's 6.1: no kernel needed.

- error_log entries (tests/fixtures/linux-6.1-debian/error_log.txt, as 6.1 wrote them) name the field the
  caret points at, and a concurrent writer's entry is not taken for ours (error_log is global);
- symstr, which 6.1.192 accepts but which corrupts its slab once the probe fires, is refused on 6.1;
- a binary's symbol table is read once per config, not once per uprobe (it cost seconds under TCG).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from kprobe_exporter import config, probes, symbols, tracefs
from kprobe_exporter.probes import EventSpec
from kprobe_exporter.tracefs import Tracefs, TracefsError

ERROR_LOG = Path(__file__).resolve().parents[1] / "fixtures" / "linux-6.1-debian" / "error_log.txt"


def event_from_command(command: str) -> EventSpec:
    """The EventSpec the agent would have built for a logged command, as a kprobe/uprobe with named args."""
    head, target, *args = command.split(" ")
    letter, _, rest = head.partition(":")
    group, _, name = rest.partition("/")
    user = target.startswith("/")
    kind = ("uprobe" if user else "kprobe") if letter == "p" else ("uretprobe" if user else "kretprobe")
    probe: dict[str, object] = {"name": name, kind: target}
    if args:
        probe["args"] = dict(a.split("=", 1) for a in args)
    cfg = config.Config.model_validate({"instance": group, "probes": [probe]})
    return probes.build_probe_set(cfg, resolve=None).events[0]


ENTRIES = tracefs.error_log_entries(ERROR_LOG.read_text())
EXPECTED = {  # command's event: (kernel_reason, the field)
    "char": ("trace_kprobe: error: Unknown type is specified (at 'char')", "args.v"),
    "char_array": ("trace_kprobe: error: Unknown type is specified (at 'char[4]')", "args.v"),
    "not_boundary": ("trace_kprobe: error: Probe point is not an instruction boundary (at 'do_sys_openat2+9')",
                     "kprobe"),
    "ret_arg1": ("trace_kprobe: error: Invalid $-variable specified (at '$arg1')", "args.v"),
    "raw_char": ("trace_kprobe: error: Unknown type is specified (at 'char')", "args.arg1"),
    "current": ("trace_kprobe: error: Invalid $-variable specified (at '$current')", "args.v"),
    "u_arg1": ("trace_uprobe: error: Invalid $-variable specified (at '$arg1')", "args.v"),
}


def command_of(entry: str) -> str:
    return entry.splitlines()[1].split("Command: ", 1)[1]


@pytest.mark.parametrize("entry", ENTRIES, ids=[command_of(e).split()[0].split("/")[1] for e in ENTRIES])
def test_error_log_reason_and_field(entry: str) -> None:
    ev = event_from_command(command_of(entry))
    assert ev.definition == command_of(entry)
    reason, field = EXPECTED[ev.name]
    assert tracefs.kernel_reason(entry) == reason
    assert tracefs.rejected_field(ev, entry) == field


def test_rejected_field_of_a_raw_line_is_raw() -> None:
    entry = next(e for e in ENTRIES if "/raw_char " in e)
    cfg = config.Config.model_validate({"instance": "g", "probes": [{"raw": command_of(entry)}]})
    ev = probes.build_probe_set(cfg, resolve=None).events[0]
    assert ev.raw and tracefs.rejected_field(ev, entry) == "raw"


def test_define_takes_its_own_error_log_entry_not_a_concurrent_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checks at once in the guest showed one's error under the other's definition."""
    ours = next(e for e in ENTRIES if "/char " in e)
    other = next(e for e in ENTRIES if "/not_boundary " in e)
    (tmp_path / "kprobe_events").write_text("")
    (tmp_path / "error_log").write_text("")

    def failing_write(path: Path | str, text: str, append: bool = False) -> None:
        (tmp_path / "error_log").write_text(ours + "\n" + other + "\n")  # the other writer's lands last
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(tracefs, "write_file", failing_write)
    tfs = Tracefs(tmp_path, "kpe_check_133")
    with pytest.raises(TracefsError) as e:
        tfs.define(event_from_command(command_of(ours)))
    assert e.value.message.endswith("error: Unknown type is specified (at 'char')")
    assert e.value.field == "args.v"


@pytest.mark.parametrize(("release", "refused"), [
    ("6.1.0-56-amd64", True), ("6.1.192", True), ("6.18.0-1-amd64", False), ("5.10.0-30-amd64", False),
])
def test_symstr_is_refused_on_6_1(release: str, refused: bool) -> None:
    cfg = config.Config.model_validate({"instance": "g", "probes": [
        {"name": "s", "kprobe": "do_sys_openat2", "args": {"ok": "%ip:symbol", "sym": "%ip:symstr"}},
        {"raw": "r:r getname +0($retval):symstr[2]"},
    ]})
    tfs = Tracefs(Path("/nonexistent"), "g")
    for ev, field in zip(probes.build_probe_set(cfg, resolve=None).events, ("args.sym", "raw"), strict=True):
        if not refused:
            tfs.check_types([ev], release)
            continue
        with pytest.raises(TracefsError) as e:
            tfs.check_types([ev], release)
        assert e.value.field == field and e.value.probe == ev.name
        assert e.value.message.startswith(f"type 'symstr' corrupts kernel memory on this kernel ({release}; ")
        assert "use ':symbol'" in e.value.message


def test_symbol_table_is_read_once_per_file_version(tmp_path: Path, progs: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = symbols._functions

    def counting(elf):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(elf)

    monkeypatch.setattr(symbols, "_functions", counting)
    monkeypatch.setattr(symbols, "_CACHE", {})
    binary = tmp_path / "fxgen"
    shutil.copy(progs["pie"], binary)
    first = symbols.resolve(str(binary), "compute")
    assert symbols.resolve(str(binary), "compute") == first
    assert symbols.resolve(str(binary), "recurse") != first
    assert len(calls) == 1
    shutil.copy(progs["nopie"], binary)  # rebuilt in place: read again
    symbols.resolve(str(binary), "compute")
    assert len(calls) == 2
