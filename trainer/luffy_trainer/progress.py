"""Training progress on the console: a progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("luffy_trainer.progress")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Shows step, reward, tokens/s and ETA for steps `first..total`."""

    def __init__(self, first: int, total: int, *, interactive: bool | None = None) -> None:
        self.first, self.total = first, total
        self.started = time.monotonic()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=first - 1, unit="step", dynamic_ncols=True, desc="luffy")

    def update(self, step: int, reward: float | None, tokens_per_s: float | None) -> None:
        parts = {}
        if reward is not None:
            parts["reward"] = f"{reward:.3f}"
        if tokens_per_s is not None:
            parts["tok/s"] = f"{tokens_per_s:,.0f}"
        if self._bar is not None:
            self._bar.set_postfix(parts, refresh=False)
            self._bar.update(1)
            return
        done = step - self.first + 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        fields = " ".join(f"{k}={v}" for k, v in parts.items())
        log.info("step %d/%d %s eta=%s", step, self.total, fields, _duration(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
