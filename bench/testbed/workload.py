"""Drive a request stream against a testbed mesh and time every request (TTFT, per-token, total).

Each request also records the plan epoch its tokens came from and the cost model's prediction for the
plan committed when it started, so one list of results feeds the table, the plots and the model check.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from splitmesh.client import Client, SplitmeshError

from .predict import Prediction, Predictor


@dataclass
class RequestResult:
    index: int  # position of the prompt in the stream
    started_s: float  # seconds after the stream began
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated ids (greedy)
    ttft_s: float = math.inf  # call to first token
    total_s: float = math.inf  # call to last token
    epochs: tuple[int, int] = (0, 0)  # plan epoch of the first and the last token
    predicted: Prediction | None = None  # cost model on the plan committed at the start
    model_inputs: dict[str, object] | None = None  # what the cost model was given for ``predicted``
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def as_row(self) -> dict[str, object]:
        """Measured and predicted figures of this request (ms) with the cost model's inputs, for the JSON record."""
        p = self.predicted
        return {"started_s": round(self.started_s, 2), "epochs": list(self.epochs), "error": self.error,
                "ttft_ms": _ms(self.ttft_s), "per_token_ms": _ms(self.per_token_s),
                "predicted_ttft_ms": _ms(p.ttft_s) if p else None,
                "predicted_per_token_ms": _ms(p.per_token_s) if p else None, "model_inputs": self.model_inputs}

    @property
    def per_token_s(self) -> float:
        """Mean decode step: (last token - first token) / (tokens - 1)."""
        n = len(self.tokens)
        return (self.total_s - self.ttft_s) / (n - 1) if self.ok and n > 1 else math.inf


def run_request(client: Client, index: int, prompt: list[int], max_new: int, t0: float,
                predictor: Predictor | None = None) -> RequestResult:
    """One greedy generation with EOS ignored, so every request yields exactly ``max_new`` tokens."""
    result = RequestResult(index, time.monotonic() - t0, len(prompt))
    if predictor is not None:
        try:
            snap = predictor.snapshot(client)
            result.predicted = predictor.predict(snap, len(prompt), max_new)
            result.model_inputs = predictor.inputs(snap)
        except SplitmeshError:
            result.predicted = None
    started = time.monotonic()
    first_epoch = 0
    epoch = 0
    try:
        for event in client.generate(prompt, max_new_tokens=max_new, ignore_eos=True):
            if not result.tokens:
                result.ttft_s = time.monotonic() - started
                first_epoch = event.epoch
            result.tokens.append(event.token_id)
            epoch = event.epoch
        result.total_s = time.monotonic() - started
    except SplitmeshError as exc:
        result.error = str(exc)
    result.epochs = (first_epoch, epoch)
    return result


def run_stream(client: Client, prompts: Sequence[list[int]], max_new: int, *, interarrival_s: float = 0.0,
               predictor: Predictor | None = None, until_s: float | None = None,
               on_done: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """Sequential when ``interarrival_s`` is 0, else open loop (one request every interval, in parallel).

    With ``until_s`` the prompts repeat until that many seconds have passed (timeline runs).
    """
    t0 = time.monotonic()
    results: list[RequestResult] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = run_request(client, i, prompts[i % len(prompts)], max_new, t0, predictor)
        with lock:
            results.append(r)
        if on_done is not None:
            on_done(r)

    def more(i: int) -> bool:
        return time.monotonic() - t0 < until_s if until_s is not None else i < len(prompts)

    if interarrival_s <= 0:
        i = 0
        while more(i):
            one(i)
            i += 1
    else:
        with ThreadPoolExecutor(max_workers=16) as pool:
            i = 0
            while more(i):
                pool.submit(one, i)
                i += 1
                time.sleep(max(0.0, t0 + i * interarrival_s - time.monotonic()))
    return sorted(results, key=lambda r: r.started_s)


@dataclass(frozen=True)
class Summary:
    """Figures of one run (one mode at one bandwidth, or one timeline run); times in ms."""

    requests: int
    failed: int
    request_ms: float  # mean end-to-end latency
    ttft_ms: float
    per_token_ms: float
    p95_request_ms: float
    tokens_per_s: float  # generated tokens over the stream's wall time
    sla: float  # share of requests (failed ones count as misses) finished under the SLA
    predicted_ttft_ms: float  # mean cost-model prediction, NaN when none could be made
    predicted_per_token_ms: float
    predicted_request_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 2) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in self.__dict__.items()}


def _ms(seconds: float) -> float | None:
    return round(seconds * 1e3, 2) if math.isfinite(seconds) else None


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def summarise(results: Sequence[RequestResult], wall_s: float, sla_ms: float) -> Summary:
    ok = [r for r in results if r.ok]
    preds = [r.predicted for r in ok if r.predicted is not None]
    totals = sorted(r.total_s * 1e3 for r in ok)
    p95 = totals[min(len(totals) - 1, math.ceil(0.95 * len(totals)) - 1)] if totals else math.nan
    return Summary(
        requests=len(results), failed=len(results) - len(ok),
        request_ms=_mean([r.total_s * 1e3 for r in ok]), ttft_ms=_mean([r.ttft_s * 1e3 for r in ok]),
        per_token_ms=_mean([r.per_token_s * 1e3 for r in ok]), p95_request_ms=p95,
        tokens_per_s=sum(len(r.tokens) for r in ok) / wall_s if wall_s > 0 else math.nan,
        sla=sum(1 for r in ok if r.total_s * 1e3 <= sla_ms) / len(results) if results else math.nan,
        predicted_ttft_ms=_mean([p.ttft_s * 1e3 for p in preds]),
        predicted_per_token_ms=_mean([p.per_token_s * 1e3 for p in preds]),
        predicted_request_ms=_mean([p.request_s * 1e3 for p in preds]))
