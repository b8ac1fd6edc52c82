"""A `vllm serve` under concurrent load: the scenario shared by tests/test_load.py (CI, CPU) and
benchmarks/bench_load.py (longer runs, CPU or the lent GPU).

- :func:`build_requests`: a deterministic mix of completions and chat, streaming and not, prompts
  of mixed length (slices of the package's calibration text: real, finite inputs), mixed
  ``max_tokens``, some streams cancelled by the client part-way.
- :func:`serve`: a real ``vllm serve`` process in its own process group on loopback; on exit it
  stops the server with SIGTERM and reports any process of that group still alive afterwards (a
  leak), then kills those.
- :func:`run_load`: the requests through the ``openai`` async client, all at once or at most
  ``concurrency`` in flight, each bounded in time, the whole run bounded in time.
- :func:`compare`: batch invariance of greedy outputs, token by token, with the tie rule below.
- :func:`read_metrics`: vLLM's Prometheus counters (preemptions: ``vllm:num_preemptions_total``,
  the counter ``vllm:num_preemptions`` in vLLM 0.26 and 0.32).

Only the standard library and ``openai`` are needed (the GPU kit has ``openai``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

CALIBRATION_TEXT = Path(__file__).resolve().parents[1] / "w4a8_backend" / "data" / "calibration.txt"

# The vLLM counter of preempted requests (vllm/v1/metrics/loggers.py, 0.26.0 and 0.32.0:
# Counter "vllm:num_preemptions"; prometheus_client exposes counters with a "_total" suffix).
PREEMPTIONS = "vllm:num_preemptions_total"

# Batch-invariance tie rule (see compare()): two greedy runs of one request may part at a step
# only where the reference's best two tokens are within TIE_NATS of each other: two bf16 steps of
# logits below 4 (the tiny test models'; reasoning and measurements in tests/test_load.py).
TIE_NATS = 2 / 64


# ----------------------------------------------------------------------------- the requests
@dataclass
class LoadRequest:
    index: int
    api: str  # "completions" | "chat"
    stream: bool
    text: str  # the prompt (completions) or the user message (chat)
    max_tokens: int
    cancel_after: int | None = None  # streamed tokens after which the client hangs up

    def label(self) -> str:
        kind = f"{self.api}{'/stream' if self.stream else ''}"
        cancel = f", cancel after {self.cancel_after}" if self.cancel_after else ""
        words = len(self.text.split())
        return f"#{self.index} {kind} ({words} words, max_tokens {self.max_tokens}{cancel})"


def _words() -> list[str]:
    return CALIBRATION_TEXT.read_text(encoding="utf-8").split()


def build_requests(n: int, *, seed: int = 0, min_words: int = 2, max_words: int = 60,
                   min_tokens: int = 4, max_tokens: int = 32, cancel_every: int = 8,
                   cancel_max_tokens: int = 120) -> list[LoadRequest]:
    """``n`` requests: the four (api, stream) kinds in turn, prompt lengths and ``max_tokens``
    drawn uniformly; every ``cancel_every``-th request is instead a stream of
    ``cancel_max_tokens`` that the client drops after 1 to ``max_tokens // 4`` tokens (0 turns
    cancellation off). The dropped streams are long so that the server is still generating them
    when the client hangs up, even with a client that lags behind the stream under load (40
    words of this text are at most 116 tokens: 120 more still fit a max_model_len of 256)."""
    rng = random.Random(seed)
    words = _words()
    kinds = [("completions", False), ("completions", True), ("chat", False), ("chat", True)]
    requests = []
    for i in range(n):
        length = rng.randint(min_words, max_words)
        start = rng.randrange(0, len(words) - length)
        api, stream = kinds[i % len(kinds)]
        tokens = rng.randint(min_tokens, max_tokens)
        cancel = None
        if cancel_every and i % cancel_every == cancel_every - 1:
            # A long stream dropped early: what the server stops generating shows it aborted.
            stream = True
            tokens = cancel_max_tokens
            cancel = rng.randint(1, max(1, max_tokens // 4))
        requests.append(LoadRequest(i, api, stream, " ".join(words[start:start + length]),
                                    tokens, cancel))
    return requests


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid`` (Linux /proc)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path
    command: list[str]
    leaked: list[int] = field(default_factory=list)  # filled in when serve() exits
    exit_code: int | None = None

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@contextlib.contextmanager
def serve(model: str | os.PathLike, serve_args: list[str], *, log: Path,
          serve_cmd: list[str] | None = None, env: dict | None = None,
          start_timeout: float = 600.0, stop_timeout: float = 60.0):
    """Start ``SERVE_CMD serve MODEL --host 127.0.0.1 --port P SERVE_ARGS`` in a new session and
    yield a :class:`Server` once ``/health`` answers 200. ``env`` entries set to None are removed
    from the server's environment.

    On exit: SIGTERM to the server, wait up to ``stop_timeout`` for it and for every other
    process of its group (vLLM's engine core, workers) to end; whatever is still alive then is
    recorded in ``Server.leaked`` and killed (SIGKILL to the group).
    """
    port = free_port()
    cmd = list(serve_cmd or [sys.executable, "-m", "vllm.entrypoints.cli.main"])
    cmd += ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), *serve_args]
    full_env = dict(os.environ)
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the tests' in-process setting
    for key, value in (env or {}).items():  # None removes a variable
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, cmd)
    pgid = proc.pid  # a session leader's group id is its pid
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode} before it was "
                                   f"healthy; command: {' '.join(cmd)}\n"
                                   + server.log_text()[-6000:])
            try:
                if _http_get(server.url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {start_timeout:.0f} s:\n"
                                   + server.log_text()[-6000:])
            time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_members(pgid):
                break
            time.sleep(0.5)
        server.exit_code = proc.poll()
        server.leaked = _group_members(pgid)
        if server.leaked or server.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=30)


# ----------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def read_metrics(url: str) -> dict[str, float]:
    """``/metrics`` as ``{name: value summed over label sets}``, plus
    ``{'name{label="value"}': value summed over the other labels}`` for every label pair."""
    status, text = _http_get(url + "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, value = m.group(1), float(m.group(3))
        keys = [name] + [f"{name}{{{pair}}}" for pair in
                         re.findall(r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"', m.group(2) or "")]
        for key in keys:
            values[key] = values.get(key, 0.0) + value
    return values


def health(url: str) -> int:
    try:
        return _http_get(url + "/health", timeout=10)[0]
    except OSError:
        return -1


# ----------------------------------------------------------------------------- the client
@dataclass
class Outcome:
    index: int
    status: str  # "ok" | "cancelled" | "error"
    tokens: list[int] = field(default_factory=list)
    # per step: {token id: logprob} of the top-2 alternatives (the chosen token included)
    top: list[dict[int, float]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of the chosen tokens
    finish_reason: str | None = None
    http_status: int | None = None  # for errors: the HTTP status, None if there was none
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None


def _token_id(token: str) -> int:
    # return_tokens_as_token_ids=True makes vLLM name every token "token_id:<id>".
    if not token.startswith("token_id:"):
        raise ValueError(f"expected 'token_id:<id>', got {token!r}")
    return int(token[len("token_id:"):])


def _take_completion_logprobs(out: Outcome, lp) -> None:
    for tok, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs or []):
        out.tokens.append(_token_id(tok))
        out.logprobs.append(tok_lp)
        out.top.append({_token_id(k): v for k, v in (top or {}).items()})


def _take_chat_logprobs(out: Outcome, lp) -> None:
    for item in lp.content or []:
        out.tokens.append(_token_id(item.token))
        out.logprobs.append(item.logprob)
        out.top.append({_token_id(t.token): t.logprob for t in item.top_logprobs or []})


async def send(client, model: str, req: LoadRequest, *, cancel: bool = True,
               timeout: float = 300.0) -> Outcome:
    """One request through the openai client (greedy, ``ignore_eos`` so a request that completes
    has exactly ``max_tokens`` tokens, top-2 log-probabilities with token ids)."""
    import openai

    out = Outcome(req.index, "ok")
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    common = dict(model=model, max_tokens=req.max_tokens, temperature=0, stream=req.stream,
                  extra_body=extra, timeout=timeout)
    if req.stream:
        common["stream_options"] = {"include_usage": True}
    cancel_after = req.cancel_after if cancel else None
    t0 = time.perf_counter()
    try:
        if req.api == "completions":
            call = client.completions.create(prompt=req.text, logprobs=2, **common)
            take = _take_completion_logprobs
        else:
            call = client.chat.completions.create(
                messages=[{"role": "user", "content": req.text}], logprobs=True, top_logprobs=2,
                **common)
            take = _take_chat_logprobs
        response = await call
        if not req.stream:
            choice = response.choices[0]
            take(out, choice.logprobs)
            out.finish_reason = choice.finish_reason
            out.ttft_s = time.perf_counter() - t0
        else:
            try:
                async for chunk in response:
                    for choice in chunk.choices:
                        if choice.logprobs is not None:
                            if out.ttft_s is None:
                                out.ttft_s = time.perf_counter() - t0
                            take(out, choice.logprobs)
                        if choice.finish_reason is not None:
                            out.finish_reason = choice.finish_reason
                    if cancel_after is not None and len(out.tokens) >= cancel_after:
                        out.status = "cancelled"
                        break
            finally:
                await response.close()
    except openai.APIStatusError as e:
        out.status, out.http_status, out.error = "error", e.status_code, str(e)[:500]
    except (openai.APIError, asyncio.TimeoutError, OSError, ValueError) as e:
        out.status, out.error = "error", f"{type(e).__name__}: {e}"[:500]
    out.latency_s = time.perf_counter() - t0
    if out.status == "ok" and (len(out.tokens) != req.max_tokens or out.finish_reason != "length"):
        out.status = "error"
        out.error = (f"incomplete: {len(out.tokens)} of {req.max_tokens} tokens, "
                     f"finish_reason {out.finish_reason!r}")
    return out


def make_client(api_url: str, timeout: float = 300.0):
    import openai

    # max_retries=0: a failed request must show up as a failure, not be retried away.
    return openai.AsyncOpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=timeout)


async def _model_id(client) -> str:
    return (await client.models.list()).data[0].id


async def run_load_async(api_url: str, requests: list[LoadRequest], *, concurrency: int,
                         request_timeout: float = 300.0, total_timeout: float = 1800.0,
                         ) -> tuple[list[Outcome], float]:
    """All requests with at most ``concurrency`` in flight; returns (outcomes, wall seconds).
    Raises TimeoutError if the whole run exceeds ``total_timeout``."""
    client = make_client(api_url, request_timeout)
    try:
        model = await _model_id(client)
        gate = asyncio.Semaphore(concurrency)

        async def one(req):
            async with gate:
                return await send(client, model, req, timeout=request_timeout)

        t0 = time.perf_counter()
        outcomes = await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)),
                                          timeout=total_timeout)
        return list(outcomes), time.perf_counter() - t0
    finally:
        await client.close()


async def run_alone_async(api_url: str, requests: list[LoadRequest], *,
                          request_timeout: float = 120.0) -> list[Outcome]:
    """Each request sent alone (one at a time, never cancelled): the references."""
    client = make_client(api_url, request_timeout)
    try:
        model = await _model_id(client)
        return [await send(client, model, r, cancel=False, timeout=request_timeout)
                for r in requests]
    finally:
        await client.close()


def warm_up(api_url: str) -> None:
    """One short completion and one chat request, so that first-call costs (tokenizer and chat
    template set-up, kernels' first run) are not counted as load; raises if either fails."""
    probe = [LoadRequest(-1, "completions", False, "warm up", 2),
             LoadRequest(-2, "chat", True, "warm up", 2)]
    for out in run_alone(api_url, probe):
        if out.status != "ok":
            raise RuntimeError(f"warm-up request failed: {out.http_status} {out.error}")


def alone_counterparts(requests: list[LoadRequest], loaded: list[Outcome]) -> list[LoadRequest]:
    """The requests to send alone as references: each request as it was, except that a stream
    the client dropped asks for just the tokens it received (greedy tokens do not depend on
    ``max_tokens``), so the reference covers exactly what is compared."""
    out = []
    for r, o in zip(requests, loaded):
        if o.status == "cancelled":
            r = replace(r, max_tokens=max(1, len(o.tokens)), cancel_after=None)
        out.append(r)
    return out


ABORT_LINE = re.compile(r"Request \S+ aborted\.")


def aborted_in_log(log_text: str) -> int:
    """Requests the server aborted (vLLM logs "Request <id> aborted." with --enable-log-requests,
    0.26 and 0.32: AsyncLLM.generate when the client's stream is cancelled)."""
    return len(ABORT_LINE.findall(log_text))


def drop_stream(api_url: str, max_tokens: int = 200, after: int = 2) -> Outcome:
    """One completion stream of ``max_tokens`` that the client drops after ``after`` tokens."""
    req = LoadRequest(-3, "completions", True, "The lighthouse keeper woke before dawn",
                      max_tokens, cancel_after=after)

    async def go():
        client = make_client(api_url, 60)
        try:
            return await send(client, await _model_id(client), req)
        finally:
            await client.close()

    return asyncio.run(go())


def hang_up(url: str, max_tokens: int, prompt: str = "The lighthouse keeper woke before dawn",
            timeout: float = 30.0) -> bool:
    """A non-streamed completion of ``max_tokens`` whose client closes the connection as soon as
    the engine runs it (``vllm:num_requests_running`` reaches 1), without reading a byte: the
    API server sees the hang-up at once (its disconnect listener, not a failed write of the next
    chunk, as for a dropped stream), so the request must be aborted in the engine long before
    its end. Returns whether the request was seen running before the hang-up."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with urllib.request.urlopen(url + "/v1/models", timeout=timeout) as r:
        model = json.loads(r.read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    try:
        sock.sendall(head + body)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if read_metrics(url).get("vllm:num_requests_running", 0) >= 1:
                return True
            time.sleep(0.005)
        return False
    finally:
        sock.close()


def run_load(api_url: str, requests: list[LoadRequest], **kwargs):
    return asyncio.run(run_load_async(api_url, requests, **kwargs))


def run_alone(api_url: str, requests: list[LoadRequest], **kwargs):
    return asyncio.run(run_alone_async(api_url, requests, **kwargs))


# ----------------------------------------------------------------------------- invariance
@dataclass
class Comparison:
    index: int
    compared: int  # steps compared (up to and including a divergence)
    identical: bool  # every compared token equal
    diverged_at: int | None = None
    tie_gap: float | None = None  # reference's top-1 minus top-2 logprob at the divergence
    ok: bool = True
    max_logprob_diff: float = 0.0  # over the equal steps
    reason: str = ""


def compare(batched: Outcome, alone: Outcome, tie_nats: float = TIE_NATS) -> Comparison:
    """Greedy tokens of a request under load against the same request sent alone.

    Identical tokens pass. Where they first differ, the two runs took different tokens from
    distributions that differ only by rounding (bf16 activations; another batch shape gives
    another GEMM/attention reduction order, a preempted request recomputes its KV cache as one
    prefill instead of step by step), so it passes only if the reference's best two tokens were
    within ``tie_nats`` of each other and the batched run took one of those two. Tokens after
    that point follow different contexts and are not compared.
    """
    n = min(len(batched.tokens), len(alone.tokens))
    diffs = []
    for step in range(n):
        a, b = alone.tokens[step], batched.tokens[step]
        if a == b:
            diffs.append(abs(alone.logprobs[step] - batched.logprobs[step]))
            continue
        ranked = sorted(alone.top[step].items(), key=lambda kv: -kv[1])
        gap = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else float("inf")
        in_top2 = b in dict(ranked[:2])
        ok = gap <= tie_nats + 1e-4 and in_top2  # 1e-4: float32 slack in the logprobs
        reason = "" if ok else (f"step {step}: alone chose {a}, under load {b}; alone's top-2 "
                                f"{ranked[:2]} (gap {gap:.4f} nats, tie threshold {tie_nats})")
        return Comparison(batched.index, step + 1, False, step, gap, ok,
                          max(diffs, default=0.0), reason)
    return Comparison(batched.index, n, True, max_logprob_diff=max(diffs, default=0.0))


# ----------------------------------------------------------------------------- summaries
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(requests: list[LoadRequest], outcomes: list[Outcome], wall_s: float) -> dict:
    done = [o for o in outcomes if o.status == "ok"]
    streamed = {r.index for r in requests if r.stream}
    lat = [o.latency_s for o in done]
    ttft = [o.ttft_s for o in outcomes if o.index in streamed and o.ttft_s is not None]
    errors = [o for o in outcomes if o.status == "error"]
    return {
        "requests": len(requests),
        "completed": len(done),
        "cancelled": sum(o.status == "cancelled" for o in outcomes),
        "errors": len(errors),
        "errors_5xx": sum(1 for o in errors if o.http_status and o.http_status >= 500),
        "wall_s": wall_s,
        "requests_per_s": len(done) / wall_s if wall_s else None,
        "output_tokens_per_s": sum(len(o.tokens) for o in outcomes) / wall_s if wall_s else None,
        "latency_p50_s": percentile(lat, 0.5),
        "latency_p99_s": percentile(lat, 0.99),
        # time to the first streamed token, over the streaming requests (cancelled ones included)
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "error_samples": [f"#{o.index}: {o.http_status} {o.error}" for o in errors[:5]],
    }


def access_log_5xx(log_text: str) -> list[str]:
    """uvicorn access-log lines whose status is 5xx."""
    return [line for line in log_text.splitlines()
            if re.search(r'"(GET|POST) [^"]*" 5\d\d\b', line)]


def to_json(obj) -> str:
    return json.dumps(obj, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                      else str(o), indent=1)
