#!/usr/bin/env python3
"""Load test of a running `pp serve` (or any OpenAI-compatible server): concurrent streaming
chat clients, bounded in requests and time; reports throughput and latency percentiles.

    python3 scripts/load_test.py --url http://127.0.0.1:8000 --model NAME \
        [--clients 32] [--requests 4] [--max-tokens 64] [--timeout 600] [--api-key KEY] [--json]

Each of --clients clients sends --requests chat requests one after another (greedy, streamed,
the user turns of configs/data/tool-calls/val.jsonl in turn). Measured per request: time to the
first token, the gaps between tokens, tokens (the server's usage count). Any failed request
counts as an error and makes the exit status 1. Needs `pip install openai`.
"""
import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def questions(path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]


async def one_request(client, model, question, max_tokens):
    start = time.perf_counter()
    stamps, tokens = [], None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if any(c.delta.content for c in chunk.choices):
            stamps.append(time.perf_counter())
    if not stamps or tokens is None:
        raise RuntimeError("the stream had no text or no usage")
    return {"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens, "seconds": stamps[-1] - start}


async def client_loop(index, args, prompts, results, errors):
    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0,
                                timeout=args.timeout)
    for r in range(args.requests):
        question = prompts[(index * args.requests + r) % len(prompts)]
        try:
            results.append(await one_request(client, args.model, question, args.max_tokens))
        except Exception as e:  # every failure is counted and reported
            errors.append(f"client {index} request {r}: {type(e).__name__}: {e}")
    await client.close()


async def run(args):
    prompts = questions(args.data)
    results, errors = [], []
    start = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(client_loop(i, args, prompts, results, errors)
                         for i in range(args.clients))), args.timeout)
    wall = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    summary = {
        "clients": args.clients, "requests": len(results) + len(errors), "errors": len(errors),
        "completion_tokens": tokens, "seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 1),
        "ttft_ms": {f"p{q}": round(1000 * percentile([r["ttft"] for r in results], q), 1)
                    for q in (50, 90, 99)},
        "inter_token_ms": {f"p{q}": round(1000 * percentile(gaps, q), 2) for q in (50, 90, 99)},
        "mean_tokens_per_request": round(statistics.mean(r["tokens"] for r in results), 1)
        if results else 0,
    }
    return summary, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole test")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--data", type=Path, default=ROOT / "configs/data/tool-calls/val.jsonl")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary, errors = asyncio.run(run(args))
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['requests']} requests from {args.clients} clients, {len(errors)} errors, "
              f"{summary['completion_tokens']} tokens in {summary['seconds']} s: "
              f"{summary['tokens_per_second']} tokens/s; time to first token p50/p90/p99 "
              f"{summary['ttft_ms']['p50']}/{summary['ttft_ms']['p90']}/{summary['ttft_ms']['p99']} ms; "
              f"between tokens {summary['inter_token_ms']['p50']}/"
              f"{summary['inter_token_ms']['p90']}/{summary['inter_token_ms']['p99']} ms")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
