"""What the suite writes: `results.json` (every row), `results.md` (tables a person reads) and PNG plots.

The tables and plots are made from the rows alone, so `python -m benchmarks --report-only --out DIR` remakes them from
a saved `results.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# 2: rows carry "inputs" (random or peaked); rows of schema 1 are random. 3: rows carry "profile" and "profile_file"
# (None unless profiled), and profiled rows "peak_detail" (where the memory live at the peak was allocated). 4: rows
# carry "profile_busy" (a profiled GPU run's span and the device's busy time in it; None otherwise). 5: "profile_busy"
# carries "idle" (where the host was while the device waited: `runner.idle_sources`)
SCHEMA = 5
MODE_ORDER = ("forward+backward", "forward", "backward")
OP_TITLES = {
    "fused_linear": "Fused linear GRPO loss (hidden states and LM-head weight in, gradients out)",
    "linear_logprobs": "Log-probs from hidden states, no gradient (the old and reference policies)",
    "loss_from_logits": "GRPO loss from logits",
    "advantages": "Group advantages",
}
NOTES = """\
How to read these tables:

- Time: median of the timed runs in ms; in parentheses the fraction of the floor, where the floor is the plain matrix
  products the op must do at the same shape and dtype (fused linear: 1 product forward, 2 backward, 3 both; log-probs:
  1), or, for the memory-bound ops, a device copy's bandwidth applied to the bytes the op must move (the logits once
  forward; the logits and their gradient backward). No fraction where the time is below the floor: a mode that does
  not do the floor's work (the fused linear backward of a provider that forms its gradients in the forward).
  **Bold**: the fastest, or the least memory, of the providers (floor excluded).
- Memory: the peak allocated beyond the inputs during the mode, in MiB, measured in a run apart from the timed ones;
  "grads" is the size of the gradients the op hands back, which every provider must allocate.
- grpo_kernels' fused linear loss forms its gradients during the forward when its inputs require grad (a training
  step), so its "forward" includes most of the backward's work and its "backward" only scales them: compare the
  forward+backward tables. The forward of every provider is measured with inputs that require grad.
- grpo_kernels (fused Triton), GPU only, is the opt-in `GRPO_KERNELS_LINEAR=fused` strategy (logits tiles kept in
  registers, the logits recomputed in the backward); grpo_kernels (Triton) is the default chunked schedule;
  grpo_kernels (vocab blocks) is the opt-in `GRPO_KERNELS_LINEAR=vocab-blocks` strategy (d_weight formed once per
  block of vocabulary columns: one more matrix product, small chunks); grpo_kernels (tiles) is the opt-in
  `GRPO_KERNELS_LINEAR=tiles` strategy (per chunk of tokens, the gradients a block of vocabulary columns at a time:
  one more matrix product, in few large chunks, with 32 MiB of bf16 logits); grpo_kernels (scratch) is the opt-in
  `GRPO_KERNELS_LINEAR=scratch` strategy (three products in 60 MiB chunks of bf16 logits, the first chunk's logits
  kept in d_weight's own memory, part of the later chunks' in d_hidden's unwritten rows on CUDA), "no borrowed rows"
  without the latter, "first sums after the logits" with the first chunk's fp32 d_hidden sums in d_weight's memory
  after its logits (fewer tokens in it) instead of d_hidden's, "separate fp32 additions" with those sums added apart
  from its bf16 products (where PyTorch's addmm can sum them itself), "Triton additions" with the chunks' d_weight
  additions by ops/weight_grad.py instead of cuBLAS; grpo_kernels (filter 2^-12) is the default
  strategy with gradient filtering (`grad_filter_eps=2**-12`, approximate), which pays on "peaked inputs" (a trained
  model's peaked softmax; see benchmarks/providers.py) and keeps every column of a flat softmax.
- Every loss is TRL's default (dapo, beta 0, on-policy) over every token. Liger's fused linear loss runs with
  `compiled=False`. Cut Cross-Entropy computes log-probs only (its cross-entropy, with its default gradient
  filtering), with a few `[N]`-sized ops around it; it is the speed reference for the fused linear op.
- Log-probs without gradient (the old and reference policies' pass of a GRPO step): inputs that do not require grad,
  under `torch.no_grad()`; `linear_logprobs` for grpo_kernels, TRL's chunked log-prob function, Cut Cross-Entropy's
  cross-entropy (`reduction="none"`), and for eager PyTorch the logits, an fp32 log-softmax and a gather.
"""


def write_json(path: Path, rows: list[dict], meta: dict[str, Any]) -> None:
    """Write `{"schema", "meta", "rows"}`, replacing the file only once the new one is complete."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, "meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)


def load(path: Path) -> tuple[dict[str, Any], list[dict]]:
    """`(meta, rows)` of a results.json."""
    data = json.loads(Path(path).read_text())
    return data["meta"], data["rows"]


def _groups(rows: Iterable[dict], op: str, modes: Iterable[str]) -> list[tuple[tuple, list[dict]]]:
    """Rows of `op` grouped by (mode, dtype, V, H, inputs), in mode order, then by dtype, V, H and inputs (random
    first); by N within a group."""
    out: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["N"]):
        if r["op"] == op and r["mode"] in modes:
            out.setdefault((r["mode"], r["dtype"], r["V"], r["H"], r.get("inputs", "random")), []).append(r)
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    return sorted(out.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2] or 0, kv[0][3] or 0,
                                               kv[0][4] != "random", kv[0][4]))  # fmt: skip


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _group_title(op: str, mode: str, dtype: str, V: int | None, H: int | None, inputs: str = "random") -> str:
    parts = [mode, dtype]
    if V is not None:
        parts.append(f"V = {V:,}")
    if H is not None:
        parts.append(f"H = {H:,}")
    if inputs != "random":
        parts.append(f"{inputs} inputs")
    return ", ".join(parts)


def _table(rows: list[dict], value: str) -> list[str]:
    """A markdown table of `value` ("time_ms", "peak_mib", or "time_range": fastest to slowest run): rows = shapes,
    columns = the providers with a result; the best time or memory in bold."""
    key = "time_min_ms" if value == "time_range" else value
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["skipped"] is None))
    labels = {r["provider"]: r["label"] for r in rows}
    shapes = sorted({(r["N"], r["B"], r["T"]) for r in rows})
    first = "rewards B" if rows[0]["op"] == "advantages" else "N (B × T)"
    extra = ["grads"] if value == "peak_mib" and rows[0]["op"] in ("fused_linear", "loss_from_logits") else []
    lines = [
        "| " + " | ".join([first, *extra, *(labels[p] for p in providers)]) + " |",
        "|" + "---|" * (1 + len(extra) + len(providers)),
    ]
    for n, b, t in shapes:
        cells = {r["provider"]: r for r in rows if (r["N"], r["B"], r["T"]) == (n, b, t)}
        done = {p: r for p, r in cells.items() if r["skipped"] is None and r[key] is not None}
        contenders = [r[key] for r in done.values() if r["role"] != "floor"]
        best = min(contenders) if contenders and value != "time_range" and len(contenders) > 1 else None
        line = [f"{n:,}" if rows[0]["op"] == "advantages" else f"{n:,} ({b} × {t:,})"]
        if extra:
            line.append(_num(next(iter(cells.values()))["grads_mib"]))
        for p in providers:
            r = done.get(p)
            if r is None:
                line.append("—")
                continue
            spread = f"{_num(r['time_min_ms'])} – {_num(r['time_max_ms'])}"
            text = spread if value == "time_range" else _num(r[value])
            fraction = r["floor_fraction"]
            if value == "time_ms" and fraction is not None and fraction <= 1 and r["role"] != "floor":
                text += f" ({fraction:.2f})"  # above 1: faster than the floor, a mode without the floor's work
            line.append(f"**{text}**" if r[key] == best and r["role"] != "floor" else text)
        lines.append("| " + " | ".join(line) + " |")
    return lines


def _skips(rows: list[dict], prefix: str) -> list[str]:
    """A line naming each provider with a skipped row among `rows` and why (none when nothing was skipped)."""
    reasons: dict[str, dict[str, None]] = {}
    for r in rows:
        if r["skipped"] is not None:
            reasons.setdefault(r["label"], {})[r["skipped"]] = None
    if not reasons:
        return []
    return [prefix + "; ".join(f"{label} ({', '.join(why)})" for label, why in reasons.items()) + ".", ""]


def _always_skipped(rows: list[dict]) -> set[str]:
    """Providers whose every row was skipped, all for one reason."""
    reasons: dict[str, set[str | None]] = {}
    for r in rows:
        reasons.setdefault(r["provider"], set()).add(r["skipped"])
    return {p for p, why in reasons.items() if len(why) == 1 and None not in why}


def _versions(versions: dict[str, str | None]) -> str:
    """`torch 2.11.0, triton 3.6.0, ...`: the packages a run found (those it did not are left out)."""
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)


def _environment_lines(meta: dict[str, Any]) -> list[str]:
    """The package's settings from the environment the run had (a chunk budget, a strategy), if any."""
    settings = meta.get("environment") or {}
    if not settings:
        return []
    return [f"Environment: {' '.join(f'{k}={v}' for k, v in settings.items())}.", ""]


def _run_lines(meta: dict[str, Any]) -> list[str]:
    """The runs whose rows a resumed sweep kept, the host's load, and the shapes a time limit left out."""
    lines = []
    for run in meta.get("earlier") or []:
        shapes = f"{run['shapes_kept']} shape" + ("" if run["shapes_kept"] == 1 else "s")
        lines += [f"Resumed: the rows of {shapes} come from `{run['command']}` ({run['date']}). "
                  f"{_versions(run.get('versions') or {})}.", ""]  # fmt: skip
    if meta.get("load_average"):
        load = " and ".join(str(x) for x in meta["load_average"])
        lines += [f"Host load (1-minute average) at the start and the end: {load}.", ""]
        threads = meta.get("cpu_threads")
        if meta.get("device_type") == "cpu" and threads and max(meta["load_average"]) > threads:
            lines += [
                f"**The host was busy** (load above its {threads} threads): other processes shared the cores, so "
                "CPU times are inflated and noisy, most for code made of many short parallel regions (an idle "
                "thread waits for a core each time). Memory is counted exactly and does not depend on the load.",
                "",
            ]
    if meta.get("not_measured"):
        lines += [f"Stopped at the time limit; not measured: {'; '.join(meta['not_measured'])}.", ""]
    return lines


def markdown(rows: list[dict], meta: dict[str, Any]) -> str:
    """results.md: per op, one time table and one memory table per (mode, dtype, V, H)."""
    versions = _versions(meta["versions"])
    lines = [
        f"# GRPO loss benchmarks: {meta['device']}",
        "",
        f"`{meta['command']}` ({meta['sweep']} sweep, {meta['date']}). {versions}.",
        "",
        *_environment_lines(meta),
        f"Timing: {meta['timing']}",
        "",
        *_run_lines(meta),
        NOTES,
    ]
    for op, title in OP_TITLES.items():
        groups = _groups(rows, op, MODE_ORDER)
        if not groups:
            continue
        mine = [r for r in rows if r["op"] == op]
        never = _always_skipped(mine)  # named once, under the op's title; other skips under their table
        lines += [f"## {title}", "", *_skips([r for r in mine if r["provider"] in never], "Not measured here: ")]
        for (mode, dtype, V, H, inputs), group in groups:
            lines += [f"### {_group_title(op, mode, dtype, V, H, inputs)}", ""]
            if any(r["skipped"] is None for r in group):
                lines += ["Time, ms (fraction of the floor):", "", *_table(group, "time_ms"), ""]
                if meta.get("device_type") == "cpu":
                    lines += ["Fastest and slowest run, ms:", "", *_table(group, "time_range"), ""]
                if any(r["peak_mib"] is not None for r in group):
                    lines += ["Peak memory beyond the inputs, MiB:", "", *_table(group, "peak_mib"), ""]
            lines += _skips([r for r in group if r["provider"] not in never], "Not measured: ")
    lines += _profiles(rows)
    return "\n".join(lines).rstrip() + "\n"


def _profiles(rows: list[dict]) -> list[str]:
    """The "where the time goes" section: for each profiled row, its top kernels (GPU) or ops (CPU) and their share of
    the profiled run's self time; the full tables are in profiles/."""
    done = [r for r in rows if r.get("profile")]
    if not done:
        return []
    clocks = {e.get("clock", "cpu") for r in done for e in r["profile"]}
    what = " and ".join(
        text for clock, text in (("device", "kernels by self device time"), ("cpu", "ops by self CPU time"))
        if clock in clocks
    )  # fmt: skip
    if len(clocks) > 1:
        what += " (the latter where the profiler saw no kernels)"
    lines = [
        "## Where the time goes",
        "",
        f"One more run of each row under `torch.profiler`: the {what}, top {len(done[0]['profile'])}; the full "
        "tables are in `profiles/`. The profiler adds its own overhead: read shares, not totals.",
        "",
    ]
    for r in done:
        shape = ", ".join(f"{k} = {r[k]:,}" for k in ("N", "H", "V") if r[k] is not None)
        title = f"{OP_TITLES[r['op']].split(' (')[0]}, {r['mode']}, {r['dtype']}, {shape}"
        if r.get("inputs", "random") != "random":
            title += f", {r['inputs']} inputs"
        lines += [f"### {r['label']}: {title}", "", "| kernel or op | ms | calls | share |", "|---|---|---|---|"]
        for e in r["profile"]:
            name = e["name"] if len(e["name"]) <= 90 else e["name"][:87] + "..."
            name = name.replace("|", "\\|")
            lines.append(f"| `{name}` | {_num(e['ms'])} | {e['calls']:,} | {e['fraction']:.0%} |")
        lines.append("")
        busy = r.get("profile_busy")
        if busy:
            span, on = busy["span_ms"], busy["device_busy_ms"]
            lines += [f"The device was busy {_num(on)} ms of the profiled run's {_num(span)} ms ({on / span:.0%}); "
                      "the rest it sat idle, waiting for the host (which the profiler slows down).", ""]  # fmt: skip
            idle = busy.get("idle") or {}
            for key, what in (("frames", "in grpo_kernels' code (its innermost frame)"),
                              ("ops", "in the op or runtime call under way")):  # fmt: skip
                if idle.get(key):
                    lines += [f"Where the host was while the device waited, {what}:", "", "| host | idle ms |",
                              "|---|---|"]  # fmt: skip
                    lines += [f"| `{e['where'].replace('|', '/')}` | {_num(e['ms'])} |" for e in idle[key]]
                    lines.append("")
        if r.get("peak_detail"):
            lines += [f"Live at the peak ({_num(r['peak_mib'])} MiB beyond the inputs), by where it was allocated:", "",
                      "| allocated at | MiB |", "|---|---|"]  # fmt: skip
            lines += [f"| `{e['where']}` | {_num(e['mib'])} |" for e in r["peak_detail"]]
            lines.append("")
    return lines


def main_mode(rows: list[dict], op: str) -> str | None:
    """The mode of `op` the console shows: forward+backward where measured, else forward, else backward (None: no
    rows of `op`)."""
    modes = {r["mode"] for r in rows if r["op"] == op}
    return next((m for m in MODE_ORDER if m in modes), None)


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    """One PNG per op: for each (dtype, V, H) of its rows of one mode (forward+backward where measured at two or more
    N, else forward, else backward) measured at two or more N, time and peak memory against N, one line per provider.
    The PNG of an op with nothing to plot is removed (it would show an earlier run). Returns the files written; none
    without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op in OP_TITLES:
        path = out / f"{op}.png"
        for mode in MODE_ORDER:
            groups = [
                (k, g) for k, g in _groups(rows, op, (mode,)) if len({r["N"] for r in g if r["skipped"] is None}) > 1
            ]
            if groups:
                break
        if not groups:
            path.unlink(missing_ok=True)
            continue
        fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
        for (ax_time, ax_mem), ((_, dtype, V, H, inputs), group) in zip(axes, groups, strict=True):
            for provider in dict.fromkeys(r["provider"] for r in group):
                done = [r for r in group if r["provider"] == provider and r["skipped"] is None]
                if not done:
                    continue
                dotted = done[0]["role"] == "floor"
                style = {"label": done[0]["label"], "marker": "o", "linestyle": ":" if dotted else "-"}
                ax_time.plot([r["N"] for r in done], [r["time_ms"] for r in done], **style)
                mem = [r for r in done if r["peak_mib"]]  # a copy allocates nothing: no point on a log axis
                if mem:
                    ax_mem.plot([r["N"] for r in mem], [r["peak_mib"] for r in mem], **style)
            title = _group_title(op, mode, dtype, V, H, inputs)
            xlabel = "rewards B" if op == "advantages" else "tokens N"
            for ax, ylabel in ((ax_time, "time, ms"), (ax_mem, "peak MiB beyond inputs")):
                ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
                ax.grid(True, which="both", alpha=0.3)
            ax_time.legend(fontsize="small")
        fig.suptitle(f"{OP_TITLES[op]}: {group[0]['device']}", fontsize="medium")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out: Path, rows: list[dict], meta: dict[str, Any]) -> list[Path]:
    """results.md and the plots in `out`; returns the paths written."""
    (out / "results.md").write_text(markdown(rows, meta))
    return [out / "results.md", *write_plots(out, rows)]


def write_all(out: Path, rows: list[dict], meta: dict[str, Any]) -> list[Path]:
    """results.json, results.md and the plots in `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", rows, meta)
    return [out / "results.json", *write_report(out, rows, meta)]
