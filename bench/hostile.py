"""One hostile or huge request beside normal traffic: does it hurt the others?

For each case (a 60,000- or 1,000,000-character word, 1 MB of prose, 3.9 MB, exactly 4 MiB,
100,000 messages) one client sends the case while another keeps sending normal requests (each
needing the encoder) back to back. Printed per case: the case's own status and time, how many
normal requests were answered while it was in flight and how many of those failed or were
rerouted to the private model (a PII check that missed its deadline), their slowest time, how
long after the case until a normal request was answered normally again, and the sidecar's RSS.

Same run, two sidecars: this checkout and `--baseline DIR` (the code before, run from its own
checkout). The baseline skips the 1M-character word: it stalled the sidecar for over 6 minutes.

    python bench/hostile.py [--baseline /tmp/base]
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model
from bench.pii_load import Stack, prompt

PROSE = (
    "The committee reviewed the quarterly figures and the hiring plan in detail, then asked the "
    "team to compare the supplier offers against last year's contracts before the next meeting. "
)


def chat(text: str) -> bytes:
    return orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]})


def sized(size: int) -> bytes:
    skeleton = len(chat(""))
    return chat((PROSE * (size // len(PROSE) + 1))[: size - skeleton])


def cases(baseline: bool) -> list[tuple[str, bytes]]:
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(100_000)]
    many.append({"role": "user", "content": "What is the capital of Portugal?"})
    out = [("60k-char word", chat("a" * 60_000))]
    if not baseline:
        out.append(("1M-char word", chat("a" * 1_000_000)))
    out += [
        ("1 MB prose", sized(1_000_000)),
        ("3.9 MB prose", sized(3_900_000)),
        ("4,194,304 bytes", sized(4 * 1024 * 1024)),
        ("100,000 messages", orjson.dumps({"model": "auto", "messages": many})),
    ]
    return out


def post(port: int, body: bytes, timeout: float = 60.0) -> tuple[int, str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("x-router-model", ""), time.perf_counter() - t
    except Exception:
        return 0, "", time.perf_counter() - t
    finally:
        conn.close()


def one_case(stack: Stack, body: bytes, salt: int) -> dict[str, float]:
    result: list[tuple[int, str, float]] = []
    thread = threading.Thread(target=lambda: result.append(post(stack.port, body)))
    normal: list[tuple[int, str, float]] = []
    thread.start()
    i = 0
    while thread.is_alive():
        normal.append(post(stack.port, chat(prompt(salt + i)), timeout=30))
        i += 1
    thread.join()
    ended = time.perf_counter()
    recovered = float("nan")
    while time.perf_counter() - ended < 120:  # until a normal request is served normally again
        status, model, _ = post(stack.port, chat(prompt(salt + i)), timeout=30)
        i += 1
        if status == 200 and model != "private":
            recovered = time.perf_counter() - ended
            break
        time.sleep(0.1)
    status, _, seconds = result[0]
    bad = [n for n in normal if n[0] != 200 or n[1] == "private"]
    return {
        "status": status,
        "seconds": seconds,
        "normal": len(normal),
        "bad": len(bad),
        "slowest": max((n[2] for n in normal), default=0.0),
        "recovered": recovered,
        "rss": stack.sidecar.rss_mb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (run from there)")
    args = parser.parse_args()
    variants = [("this checkout", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    print(f"CPU: {cpu_model()}; normal requests need the encoder (bundled-style policy, PII reroute)")
    print(f"{'sidecar':<14} {'case':<17} {'status':>6} {'its s':>6} {'normal':>6} {'failed':>6} "
          f"{'slowest s':>9} {'recovery s':>10} {'RSS MB':>7}")  # fmt: skip
    salt = 0
    for name, checkout in variants:
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(Path(tmp), checkout)
            try:
                for i in range(20):
                    post(stack.port, chat(prompt(10**6 + i)))  # warm-up
                print(f"{name:<14} {'(idle)':<17} {'':>6} {'':>6} {'':>6} {'':>6} {'':>9} {'':>10} "
                      f"{stack.sidecar.rss_mb():>7.0f}")  # fmt: skip
                for case, body in cases(baseline=checkout is not None):
                    r = one_case(stack, body, salt)
                    salt += 1000
                    print(f"{name:<14} {case:<17} {r['status']:>6} {r['seconds']:>6.2f} {r['normal']:>6} "
                          f"{r['bad']:>6} {r['slowest']:>9.2f} {r['recovered']:>10.2f} {r['rss']:>7.0f}",
                          flush=True)  # fmt: skip
            finally:
                stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
