"""The options of ``mtreg serve``, in one value shared by the app, batcher and reloader."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how.

    Attributes:
        bundle: a bundle directory, or an alias / bundle id of the registry.
        tasks: serve only these tasks (default: all the bundle holds).
        backend: ``fastest`` (per batch size, the fastest backend the bundle's quality
            gate allows; torch without a gate), ``torch``, a gated backend by name
            (``torch-bf16``, ``onnx-int8``, ...), ``onnx`` or ``auto`` (the faster of the two).
        max_batch_size: most inputs one forward pass takes.
        max_wait_ms: how long the first queued input waits for others to fill a batch.
        queue_size: most inputs waiting (over all requests); past it a request gets 503.
        max_inputs: most inputs in one request.
        max_text_chars: longest text accepted (texts are truncated to the task's
            max_length in tokens anyway; this bounds the tokeniser's work).
        max_body_bytes: largest request body.
        poll_seconds: how often the alias is looked up for hot reload (0: never).
        retry_after_s: the Retry-After header of a 503.
        drain_seconds: how long shutdown waits for queued work.
        header_timeout_s: a request line and headers must all arrive within this many
            seconds of the connection opening (or of the previous response); else 408.
        body_timeout_s: a request body must all arrive within this many seconds of its
            headers; else 408.
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        max_connections: most open connections; a request on one past it gets 503.
        access_log: where to write one JSON line per request: a file (appended to), ``-``
            for standard error, or None for no access log.
        length_buckets: run a batch's rows in sub-batches of similar token length.
        tokenizer_thread: tokenise the next batch on a thread of its own while one runs.
        device: where the torch network runs: ``cpu``, or ``cuda[:N]`` (a GPU, under
            bf16/fp16 autocast; :mod:`mtreg.runtime.device`).
    """

    bundle: str = "serving"
    tasks: tuple[str, ...] | None = None
    backend: str = "fastest"
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 512
    max_inputs: int = 64
    max_text_chars: int = 10_000
    max_body_bytes: int = 4 * 1024 * 1024
    poll_seconds: float = 2.0
    retry_after_s: int = 1
    drain_seconds: float = 30.0
    # Slow or numerous clients must not hold the server: without these bounds a client
    # trickling a byte at a time keeps its connection (and a file descriptor) forever.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000
    access_log: str | None = None
    length_buckets: bool = True
    tokenizer_thread: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1 or self.max_inputs < 1:
            raise ValueError("max batch size, queue size and max inputs must be at least 1")
        if self.max_wait_ms < 0 or self.poll_seconds < 0:
            raise ValueError("max wait and poll interval cannot be negative")
        if min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s) <= 0:
            raise ValueError("header, body and keep-alive timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if self.max_inputs > self.queue_size:
            # A request larger than the whole queue could never be admitted.
            raise ValueError(
                f"max inputs per request ({self.max_inputs}) exceeds the queue size "
                f"({self.queue_size})"
            )
