"""Errors: what the user must fix, as one line naming file, probe and field; one type, one formatter.

A mistake in a file, or what the host or the kernel refuses. The command line prints `line()` and
exits 2; an error without a file of its own is put on the config that was run.
"""

from __future__ import annotations


def format_error(file: str, who: str, field: str, message: str) -> str:
    """`FILE: probe 'a', field 'args.x': MESSAGE`, each part only when there is one."""
    where = ", ".join(p for p in (who, f"field {field!r}" if field else "") if p)
    head = ": ".join(p for p in (file, where) if p)
    return f"{head}: {message}" if head else message


class UserError(Exception):
    """One user-facing error: message, the probe and the config field it is about, the file it is in.

    `who` is how the line names the probe when that is not "probe 'NAME'" ("pair 'x'", "probe #2").
    """

    def __init__(self, message: str, probe: str = "", field: str = "", file: str = "", who: str = "") -> None:
        super().__init__(message)
        self.message, self.probe, self.field, self.file = message, probe, field, file
        self.who = who or (f"probe {probe!r}" if probe else "")

    def line(self) -> str:
        return format_error(self.file, self.who, self.field, self.message)

    def in_file(self, file: str) -> UserError:
        """The same error, put on a file when it names none of its own."""
        self.file = self.file or file
        return self

    def __str__(self) -> str:
        return self.line()


class TracefsError(UserError):
    """The kernel refused something, or tracefs is unusable; the text says what and why.

    Its own type because callers collect these as problems (removal goes on past them)."""
