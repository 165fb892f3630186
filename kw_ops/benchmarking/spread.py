"""How far to trust a row measured in interleaved rounds: median, min-max spread, per-round ratios to the
static network, and the flags that mark a row measured while the machine was busy."""
from __future__ import annotations

import statistics

#: a row is flagged when its min-max spread over the rounds, or that of its per-round ratio to the static
#: network, exceeds this share of the median
SPREAD_LIMIT = 0.10
#: ... or when its threads waited on a run queue (another process had the CPU) for this share of the time
WAIT_LIMIT = 0.10


def schedule(methods: int, rounds: int) -> list[tuple[int, int]]:
    """(round, method) in the order they run: every method once per round, A B C, A B C, ..."""
    return [(r, m) for r in range(rounds) for m in range(methods)]


def spread(values) -> float:
    """Min-max spread as a share of the median."""
    return (max(values) - min(values)) / statistics.median(values)


def summarise(seconds: list[float], static_seconds: list[float] | None, waits: list[float]) -> dict:
    """Median, min, max and spread of per-round times; median and spread of the per-round ratio to the static
    network's time in the same round; the share of the time spent waiting for a CPU; and why to distrust it."""
    out = {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "spread": spread(seconds),
           "wait": sum(waits) / sum(seconds)}
    reasons = []
    if out["spread"] > SPREAD_LIMIT:
        reasons.append(f"spread {out['spread']:.0%}")
    if static_seconds is not None:
        ratios = [s / base for s, base in zip(seconds, static_seconds)]
        out["ratio"], out["ratio_spread"] = statistics.median(ratios), spread(ratios)
        if out["ratio_spread"] > SPREAD_LIMIT:
            reasons.append(f"rounds disagree by {out['ratio_spread']:.0%}")
    if out["wait"] > WAIT_LIMIT:
        reasons.append(f"waited {out['wait']:.0%} for a CPU")
    out["flags"] = reasons
    return out


def busy_warning(rows: list[dict]) -> str | None:
    """One line naming the rows to distrust, or None when every row held still."""
    flagged = [f"{r['model']} {r['method']}" for r in rows if r.get("flags")]
    if not flagged:
        return None
    which = "every row" if len(flagged) == sum(r["status"] == "ok" for r in rows) else "; ".join(flagged)
    return (f"warning: the machine was busy while {len(flagged)} row(s) ran (marked !: spread over {SPREAD_LIMIT:.0%}, "
            f"rounds disagreeing, or run-queue wait over {WAIT_LIMIT:.0%}); distrust {which}")
