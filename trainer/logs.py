"""Where the metrics go: a progress bar and one line per step on stdout, `metrics.jsonl`, TensorBoard when it is
installed, and `curves.png` at the end."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

from tqdm.auto import tqdm

# the metrics of the per-step line, with their short names
LINE = (("reward", "reward"), ("kl", "kl"), ("entropy", "entropy"), ("completions/mean_length", "len"),
        ("loss", "loss"), ("grad_norm", "grad"), ("tokens_per_second", "tok/s"))  # fmt: skip


class MetricsLogger:
    """Writes each step's metrics to stdout, `metrics.jsonl` and TensorBoard; only on the main process.

    Args:
        output_dir: where `metrics.jsonl` (and `tensorboard/`) go.
        max_steps: length of the progress bar.
        start_step: the step a resumed run starts after; later lines of an existing `metrics.jsonl` are dropped.
        enabled: False on the other processes.
        tensorboard: log to TensorBoard too, when it is installed.
    """

    def __init__(self, output_dir: Path, max_steps: int, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        self.writer = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_metrics(self.path) if row["step"] <= start_step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.bar = tqdm(total=max_steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
        parts = [f"step {step}"]
        parts += [f"{short} {_fmt(metrics[k])}" for k, short in LINE if k in metrics]
        if metrics.get("skipped_steps"):
            parts.append(f"skipped {int(metrics['skipped_steps'])}")
        self.bar.write(" | ".join(parts))
        self.bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a `metrics.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(path: Path, png: Path) -> None:
    """Reward (total and per function), KL to the reference (entropy when beta = 0) and completion length per step,
    from `metrics.jsonl`, as a PNG; only a warning when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn(f"matplotlib is not installed, so no {png.name} (pip install matplotlib)", stacklevel=2)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    if not rows:
        return
    steps = [r["step"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(steps, series("reward"), label="reward (weighted sum)", linewidth=2)
    for key in sorted(k for k in rows[-1] if k.startswith("rewards/") and k.endswith("/mean")):
        ax.plot(steps, series(key), label=key.split("/")[1], alpha=0.7)
    ax.set_title("mean reward")
    ax.legend()
    ax = axes[1]
    key = "kl" if "kl" in rows[-1] else "entropy"
    ax.plot(steps, series(key), color="tab:red")
    ax.set_title("KL to the reference" if key == "kl" else "entropy (no KL term: beta = 0)")
    ax = axes[2]
    ax.plot(steps, series("completions/mean_length"), color="tab:green", label="mean")
    ax.fill_between(steps, series("completions/min_length"), series("completions/max_length"), alpha=0.2,
                    color="tab:green", label="min-max")  # fmt: skip
    ax.set_title("completion length (tokens)")
    ax.legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)
    plt.close(fig)
