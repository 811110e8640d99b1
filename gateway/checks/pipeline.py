"""Runs the checks of one SMTP stage in order, honouring each check's mode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.checks.base import ACCEPT, Check, Context, Deps, Stage, Verdict


@dataclass(frozen=True)
class CheckRun:
    """One check's part in a run, for ``gateway explain``: its mode, what it said (None when
    it did not run: off, or inactive for this transaction) and how long it took."""

    name: str
    stage: Stage
    mode: str
    verdict: Verdict | None
    ms: float | None


@dataclass
class Outcome:
    verdict: Verdict = ACCEPT
    decided_by: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    monitored: list[tuple[str, Verdict]] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    drop: dict[str, str] = field(default_factory=dict)  # recipient -> "check:rule" (Verdict.drop)
    trace: list[CheckRun] | None = None  # filled when a caller sets it to a list (explain)


class Pipeline:
    def __init__(self, checks: list[Check], deps: Deps, observe=None) -> None:
        self.deps = deps
        self.by_stage = {stage: [c for c in checks if c.stage is stage] for stage in Stage}
        self.observe = observe or (lambda name, seconds: None)

    def needs_message(self, stage: Stage, ctx: Context) -> bool:
        """Whether a check that will run at ``stage`` reads the parsed MIME tree (so the
        handler parses only when one does)."""
        return any(c.uses_message and c.settings(ctx).mode != "off" for c in self.by_stage[stage])

    async def run(self, stage: Stage, ctx: Context, outcome: Outcome | None = None) -> Outcome:
        """Run ``stage``'s checks; the first enforced non-accept verdict ends the run."""
        outcome = outcome or Outcome()
        for check in self.by_stage[stage]:
            mode = check.settings(ctx).mode
            if mode == "off" or not check.active(ctx):
                if outcome.trace is not None:
                    outcome.trace.append(CheckRun(check.name, stage, mode, None, None))
                continue
            started = time.perf_counter()
            verdict = await check.check(ctx)
            elapsed = time.perf_counter() - started
            outcome.timings_ms[check.name] = round(elapsed * 1000, 3)
            if outcome.trace is not None:
                outcome.trace.append(CheckRun(check.name, stage, mode, verdict,
                                              outcome.timings_ms[check.name]))
            self.observe(check.name, elapsed)
            if verdict.accepted:
                outcome.headers.extend(verdict.headers)
                if verdict.drop:
                    if mode == "monitor":
                        outcome.monitored.append((check.name, verdict))
                        continue
                    outcome.drop.update((r, f"{check.name}:{rule}") for r, rule in verdict.drop)
                    if ctx.recipients and all(r in outcome.drop for r in ctx.recipients):
                        break  # nothing left to relay: the later checks have nothing to decide
                continue
            if mode == "monitor":
                # the message goes on; what the check found (e.g. Authentication-Results) is
                # still true, so its headers are kept
                outcome.monitored.append((check.name, verdict))
                outcome.headers.extend(verdict.headers)
                continue
            outcome.verdict, outcome.decided_by = verdict, check.name
            break
        return outcome
