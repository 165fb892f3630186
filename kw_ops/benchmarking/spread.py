"""How far to trust a row measured in interleaved rounds: median, spread (interquartile range), per-round
ratios to the static network, and the flags that mark a row whose rounds disagree, with the likely cause."""
from __future__ import annotations

import statistics

#: a row is flagged when the interquartile range of its blocks, or of its per-round ratio to the static
#: network, exceeds this share of the median. Calibrated on the quick default (224x224, batch 2, 18 rows) on the
#: 2-core development machine: three idle runs had their rows' largest spreads at 0-21 % (the two largest per run
#: 13-21 %), a run beside four busy processes had 22-93 % in every row, with run-queue waits of 95-147 %
SPREAD_LIMIT = 0.20
#: ... or when its threads waited on a run queue (another process had the CPU) for this share of the time
WAIT_LIMIT = 0.10


def spread(values) -> float:
    """Interquartile range as a share of the median (inclusive quartiles: for two values, half their
    difference; one value has none). Robust to one outlying block once there are four or more."""
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return (high - low) / statistics.median(values)


def summarise(seconds: list[float], static_seconds: list[float] | None, waits: list[float],
              static_median: float | None = None) -> dict:
    """Median, min, max and spread of the blocks' times; the ratio of the median to the static network's
    median (`static_median`, default: that of `static_seconds`) and the spread of the per-round ratios to
    `static_seconds` (the static blocks paired with these); the share of the time spent waiting for a CPU;
    and why to distrust the row. The ratio of medians stays put when one static block is an outlier (the
    static network has the most blocks); the per-round ratios are what tells a round apart."""
    out = {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "spread": spread(seconds),
           "wait": sum(waits) / sum(seconds)}
    reasons = []
    if out["spread"] > SPREAD_LIMIT:
        reasons.append(f"spread {out['spread']:.0%}")
    if static_seconds is not None:  # round by round, as far as both have blocks
        ratios = [s / base for s, base in zip(seconds, static_seconds)]
        base = static_median if static_median is not None else statistics.median(static_seconds)
        out["ratio"], out["ratio_spread"] = out["median"] / base, spread(ratios)
        if out["ratio_spread"] > SPREAD_LIMIT:
            reasons.append(f"rounds disagree by {out['ratio_spread']:.0%}")
    if out["wait"] > WAIT_LIMIT:
        reasons.append(f"waited {out['wait']:.0%} for a CPU")
    out["flags"] = reasons
    return out


def busy_warning(rows: list[dict]) -> str | None:
    """One line naming the rows to distrust and why, or None when every row held still. Rows whose threads
    waited for a CPU mean another process was busy; rows that varied without waiting mean short blocks or
    a machine that does not hold its clock (more blocks: --repeat, --min-time)."""
    flagged = [r for r in rows if r.get("flags")]
    if not flagged:
        return None
    names = [f"{r['model']} {r['method']}" for r in flagged]
    which = "every row" if len(flagged) == sum(r["status"] == "ok" for r in rows) else "; ".join(names)
    waited = sum(float(r.get("cpu_wait_pct") or 0) > 100 * WAIT_LIMIT for r in flagged)
    causes = []
    if waited:
        causes.append(f"the machine was busy: other processes held the CPU while {waited} of them ran (run-queue "
                      f"wait over {WAIT_LIMIT:.0%})")
    if waited < len(flagged):
        causes.append(f"{len(flagged) - waited} varied with no other process on the CPU, which is this machine's "
                      "own noise (short blocks, clock changes): more blocks (--repeat, --min-time) firm them up")
    cause = "; ".join(causes)
    return (f"warning: {len(flagged)} row(s) marked ! (spread over {SPREAD_LIMIT:.0%}, rounds disagreeing, or "
            f"run-queue wait over {WAIT_LIMIT:.0%}); {cause}; distrust {which}")
