"""Results of one bench run and their Markdown rendering."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.loadgen import WrkResult

DIRECT = "direct upstream"


@dataclass
class Row:
    """One case against one target: a wrk run, a series of logins, or why it could not run."""

    case: str
    title: str
    target: str
    wrk: WrkResult | None = None
    body_problem: str | None = None
    login_ms: list[float] = field(default_factory=list)
    login_failures: int = 0
    login_seconds: float = 0.0
    skipped: str | None = None  # the reason, when the case did not run against this target
    is_login: bool = False
    # CPU time (user + system) of the server's processes per request: less sensitive to the
    # other load on a shared machine than req/s. None when its processes are not visible.
    cpu_us: float | None = None

    @property
    def rps(self) -> float:
        if self.wrk is not None:
            return self.wrk.rps
        if self.login_ms and self.login_seconds:
            return len(self.login_ms) / self.login_seconds
        return 0.0

    @property
    def p50_ms(self) -> float | None:
        if self.wrk is not None:
            return self.wrk.lat_p50_us / 1000
        return statistics.median(self.login_ms) if self.login_ms else None

    @property
    def p99_ms(self) -> float | None:
        if self.wrk is not None:
            return self.wrk.lat_p99_us / 1000
        if len(self.login_ms) >= 2:
            return statistics.quantiles(self.login_ms, n=100, method="inclusive")[98]
        return self.login_ms[0] if self.login_ms else None

    @property
    def errors(self) -> int:
        if self.wrk is not None:
            return self.wrk.errors
        return self.login_failures

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.errors == 0 and self.body_problem is None


@dataclass
class Memory:
    peak_rss_kib: int = 0
    start_rss_kib: int = 0
    processes: int = 1
    sessions: int = 0
    sessions_rss_before_kib: int = 0
    sessions_rss_after_kib: int = 0
    sealed_bytes: float = 0.0
    sessions_error: str | None = None

    @property
    def bytes_per_session(self) -> float:
        if not self.sessions:
            return 0.0
        return (self.sessions_rss_after_kib - self.sessions_rss_before_kib) * 1024 / self.sessions


@dataclass
class Report:
    heading: str
    setup_lines: list[str]
    rows: list[Row]
    memory: Memory
    ours: str
    others: list[str]
    profile_lines: list[str] = field(default_factory=list)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _rps(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "—"
    ratio = num / den
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"


def _direct_rps(rows: list[Row], direct_case: str) -> float | None:
    for row in rows:
        if row.case == direct_case and row.target == DIRECT and row.wrk is not None:
            return row.rps
    return None


def render(report: Report, direct_case_of: dict[str, str | None]) -> str:
    out = [f"## {report.heading}", "", *report.setup_lines, ""]
    out += ["| case | target | req/s | p50 ms | p99 ms | errors | req/s ÷ direct | CPU µs/req |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    last_case = None
    for row in report.rows:
        title = row.title if row.case != last_case else ""
        last_case = row.case
        if row.skipped is not None:
            out.append(f"| {title} | {row.target} | n/a: {row.skipped} | — | — | — | — | — |")
            continue
        direct_case = direct_case_of.get(row.case)
        ratio = "1" if row.target == DIRECT else (
            _ratio(row.rps, _direct_rps(report.rows, direct_case)) if direct_case else "—")
        errors = row.wrk.error_text() if row.wrk is not None else str(row.errors)
        if row.body_problem:
            errors += f" ⚠ body check: {row.body_problem}"
        out.append(f"| {title} | {row.target} | {_rps(row.rps)} | {_num(row.p50_ms)} | "
                   f"{_num(row.p99_ms)} | {errors} | {ratio} | {_num(row.cpu_us, 0)} |")
    out.append("")
    out += _memory_lines(report.memory, report.ours)
    if report.others:
        out += ["", *_comparison(report)]
    if report.profile_lines:
        out += ["", *report.profile_lines]
    return "\n".join(out) + "\n"


def _memory_lines(mem: Memory, ours: str) -> list[str]:
    lines = [f"- {ours} peak RSS (VmHWM{', summed over its processes' if mem.processes > 1 else ''}"
             f"): **{mem.peak_rss_kib / 1024:,.1f} MiB** after every case above "
             f"({mem.start_rss_kib / 1024:,.1f} MiB when ready)"]
    if mem.sessions_error:
        lines.append(f"- RSS per session: not measured: {mem.sessions_error}")
    elif mem.sessions:
        lines.append(
            f"- RSS per session, memory store: {mem.sessions:,} sessions added "
            f"{(mem.sessions_rss_after_kib - mem.sessions_rss_before_kib) / 1024:,.1f} MiB "
            f"({mem.sessions_rss_before_kib / 1024:,.1f} → "
            f"{mem.sessions_rss_after_kib / 1024:,.1f} MiB) = **{mem.bytes_per_session:,.0f} "
            f"bytes per session** (sealed session {mem.sealed_bytes:,.0f} bytes; created "
            f"in-process by bench/sessions_rss.py)")
    return lines


def _comparison(report: Report) -> list[str]:
    """Per case: ours against each other gateway; above 1x means ours is better."""
    head = "| case | " + report.ours + " | " + " | ".join(
        f"{o} | ours ÷ {o}" for o in report.others) + " |"
    out = ["Ours against the others, same run (above 1x = ours better: more req/s, lower p99 "
           "or a faster login):", "", head,
           "| --- | ---: |" + " ---: | ---: |" * len(report.others)]
    by_key = {(r.case, r.target): r for r in report.rows}
    cases: list[tuple[str, str]] = []
    for row in report.rows:
        if (row.case, row.title) not in cases:
            cases.append((row.case, row.title))
    for case, title in cases:
        ours = by_key.get((case, report.ours))
        if ours is None:
            continue
        cells = [title, _cell(ours)]
        for other in report.others:
            theirs = by_key.get((case, other))
            cells.append(_cell(theirs))
            if ours.skipped or theirs is None or theirs.skipped:
                cells.append("—")
            elif ours.is_login:
                cells.append(f"login {_ratio(theirs.p50_ms, ours.p50_ms)}")
            else:
                cells.append(f"req/s {_ratio(ours.rps, theirs.rps)}, "
                             f"p99 {_ratio(theirs.p99_ms, ours.p99_ms)}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _cell(row: Row | None) -> str:
    if row is None or row.skipped is not None:
        return "n/a"
    if row.is_login:
        return f"{_num(row.p50_ms, 1)} ms"
    return f"{_rps(row.rps)} req/s, p99 {_num(row.p99_ms)} ms"
