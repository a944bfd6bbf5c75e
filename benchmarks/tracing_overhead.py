"""What trace context and spans cost an append: ``python -m benchmarks.tracing_overhead MODE N [URL]``.

MODE is ``no-otel`` (the opentelemetry package hidden, as when the extra is not installed),
``api`` (installed, no SDK: the API's no-op tracer), or ``sdk`` (an SDK TracerProvider with no
exporter). Appends N single-event batches to a ``memory://`` store and prints microseconds per
append. Run it against another checkout's ``src`` (PYTHONPATH) to compare side by side, or under
``valgrind --tool=callgrind`` with two values of N to count instructions per append.
"""

from __future__ import annotations

import asyncio
import sys
import time


def main() -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    url = sys.argv[3] if len(sys.argv) > 3 else "memory://"
    if mode == "no-otel":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # import fails: not installed
    elif mode == "sdk":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    import tidings
    from tidings import open_store

    class Noted(tidings.Event):
        text: str

    async def run() -> float:
        async with open_store(url) as store:
            events = [Noted(text="x")]
            await store.append("warm", events)
            start = time.perf_counter()
            for i in range(count):
                await store.append(f"s-{i % 100}", events)
            return time.perf_counter() - start

    elapsed = asyncio.run(run())
    print(f"{mode}: {elapsed / max(count, 1) * 1e6:.2f} us/append")


if __name__ == "__main__":
    main()
