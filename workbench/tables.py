"""The results table: one row per model, from Measurements; numeric (`results_table`) and for reading
(`display_table`: 2-3 significant figures, units, speedups with their 95% interval as `4.3x (4.1-4.5)`).

    >>> results_table({"baseline": base, "quant=int8": m}, "baseline")
"""
from __future__ import annotations

from typing import Any

from .measure.measurement import Measurement, significant


def results_table(rows: dict[str, Measurement], baseline: str | None = None):
    """A comparison DataFrame: metric, latency p50/p95 per batch size, speedup with its interval, size, params,
    MACs; for causal language models also tokens/s and its ratio with interval per generation setting. Ratios are
    against `baseline` (default: the first row); the baseline's own speedup is 1."""
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    names = list(rows)
    base = rows[baseline or names[0]]
    batches = base.batch_sizes or next(iter(rows.values())).batch_sizes
    generated = base.generation.settings if base.generation is not None else []  # causal LMs (see decoding)
    table = {}
    for name in names:
        m = rows[name]
        own = m is base or name == baseline
        out: dict[str, Any] = {m.metric_name: m.metric, f"Δ {m.metric_name}": m.metric - base.metric}
        if base.perplexity is not None:  # causal language models
            out["perplexity"] = m.perplexity
        for b in batches:
            lat = m.latency.get(b)
            s = m.speedups.get(b)
            out[f"p50 ms (b={b})"] = lat.p50_ms if lat else None
            out[f"p95 ms (b={b})"] = lat.p95_ms if lat else None
            out[f"speedup (b={b})"] = 1.0 if own else (s.ratio if s else None)
            out[f"speedup low (b={b})"] = 1.0 if own else (s.low if s else None)
            out[f"speedup high (b={b})"] = 1.0 if own else (s.high if s else None)
        for g in generated:
            mine = m.generation.setting(g.batch, g.prompt) if m.generation is not None else None
            where = f"(b={g.batch}, p={g.prompt})"
            ratio = (1.0, 1.0, 1.0) if own else (mine.ratio if mine else None) or (None,) * 3
            out[f"tokens/s {where}"] = mine.tokens_per_s[0] if mine else None
            out[f"tokens/s × {where}"], out[f"tokens/s × low {where}"], out[f"tokens/s × high {where}"] = ratio
        if generated:
            out["same greedy tokens"] = 1.0 if own else (m.generation.same_tokens if m.generation else None)
        out["stable"] = m.stable
        out["size MB"] = m.size_bytes / 1e6
        out["size ×"] = m.size_bytes / base.size_bytes
        if m.sparse_size_bytes and m.sparse_size_bytes < 0.9 * m.size_bytes:  # only where zeros make it pay
            out["sparse MB"] = m.sparse_size_bytes / 1e6
            out["sparse size ×"] = m.sparse_size_bytes / base.size_bytes
        out["params"] = m.params
        out["nonzero"] = m.nonzero_params
        out["MACs"] = m.macs
        out["backend"] = m.backend
        table[name] = out
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "model"
    return df


def table(results, numeric: bool = False):
    """The baseline and every Result's candidate in one table (each against its own paired baseline timing);
    for reading unless `numeric`.

        >>> wb.table(wb.run_many(model, ["quant=int8", "quant=fp16"], data))
    """
    import pandas as pd

    from .errors import WorkbenchError

    results = list(results) if not hasattr(results, "measurement") else [results]
    if not results:
        raise WorkbenchError("no results to tabulate; give at least one Result")
    df = pd.concat([results[0].table().iloc[[0]]] + [r.table().iloc[[1]] for r in results])
    return df if numeric else display_table(df)


def human(n: float | None) -> str:
    """12300000 -> '12.3M', 950 -> '950'."""
    if n is None or n != n:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{significant(n / size, 3)}{unit}"
    return significant(n, 3)


def speedup_text(ratio, low, high, stable: bool = True) -> str:
    if ratio is None or ratio != ratio:
        return "–"
    if low == high == ratio == 1.0:
        return "1x"
    from .measure.measurement import interval_text

    return interval_text((ratio, low, high), "x", 2) + ("" if stable else " ?")


def display_table(df):
    """`results_table` for reading: strings with 2-4 significant figures and units; each speedup with its 95%
    interval ('?' marks one timed while the machine was busy); p95 and the interval columns folded in."""
    import pandas as pd

    if df.empty:
        return df
    metric = df.columns[0]
    batches = [c[len("p50 ms (b="):-1] for c in df.columns if c.startswith("p50 ms (b=")]
    out = pd.DataFrame(index=df.index)
    out[metric] = [significant(v, 4) for v in df[metric]]
    out[f"Δ {metric}"] = [("+" if v > 0 else "") + significant(v, 2) if v else "0" for v in df[f"Δ {metric}"]]
    if "perplexity" in df:
        out["perplexity"] = [significant(v, 3) if v == v and v is not None else "–" for v in df["perplexity"]]
    for b in batches:
        out[f"p50 ms (b={b})"] = [significant(v, 3) for v in df[f"p50 ms (b={b})"]]
        out[f"speedup (b={b})"] = [speedup_text(r, lo, hi, st) for r, lo, hi, st in
                                   zip(df[f"speedup (b={b})"], df[f"speedup low (b={b})"],
                                       df[f"speedup high (b={b})"], df["stable"])]
    for where in [c[len("tokens/s × low "):] for c in df.columns if c.startswith("tokens/s × low ")]:
        out[f"tokens/s {where}"] = [significant(v, 3) if v == v and v is not None else "–"
                                    for v in df[f"tokens/s {where}"]]
        out[f"tokens/s × {where}"] = [speedup_text(r, lo, hi) for r, lo, hi in
                                      zip(df[f"tokens/s × {where}"], df[f"tokens/s × low {where}"],
                                          df[f"tokens/s × high {where}"])]
    if "same greedy tokens" in df:
        out["same greedy tokens"] = [f"{v:.0%}" if v == v and v is not None else "–"
                                     for v in df["same greedy tokens"]]
    out["size"] = [f"{significant(v, 3)} MB" for v in df["size MB"]]
    out["size ×"] = [significant(v, 2) for v in df["size ×"]]
    if "sparse size ×" in df:
        out["sparse size ×"] = [significant(v, 2) if v == v else "–" for v in df["sparse size ×"]]
    out["MACs"] = [human(v) for v in df["MACs"]]
    out["backend"] = df["backend"]
    return out


def pareto_front(df, metric: str = "metric", cost: str = "latency_p50_ms_b1") -> list:
    """Index labels of the rows no other row beats on both higher `metric` and lower `cost`."""
    points = df[[metric, cost]].dropna()
    front = []
    for i, (m, c) in points.iterrows():
        dominated = ((points[metric] >= m) & (points[cost] <= c) & ((points[metric] > m) | (points[cost] < c))).any()
        if not dominated:
            front.append(i)
    return front


def generation_table(baseline, candidate):
    """A causal language model's generation, original beside optimized, one row per setting (batch, prompt
    length): time to first token and tokens per second (medians, their interval in brackets) and the
    optimized model's tokens per second against the original's from paired runs; None when nothing was timed."""
    import pandas as pd

    from .measure.measurement import interval_text

    b, c = baseline.generation, candidate.generation
    if b is None or c is None or not b.settings or not c.settings:
        return None
    rows = []
    for s in c.settings:
        ref = b.setting(s.batch, s.prompt)
        if ref is None:
            continue
        rows.append({"batch": s.batch, "prompt": s.prompt, "first token ms (original)": interval_text(ref.ttft_ms),
                     "first token ms": interval_text(s.ttft_ms), "tokens/s (original)": interval_text(ref.tokens_per_s),
                     "tokens/s": interval_text(s.tokens_per_s),
                     "tokens/s ratio": interval_text(s.ratio, "x") if s.ratio else "–"})
    return pd.DataFrame(rows).set_index(["batch", "prompt"]) if rows else None
