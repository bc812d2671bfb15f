#!/usr/bin/env python3
"""Scores generated tool calls against the reference answers of a chat dataset.

    python3 scripts/score_tool_calls.py REFERENCE.jsonl GENERATED.jsonl [--json]

REFERENCE holds `{"messages": [...]}` rows whose last message is the assistant's reference tool
call (e.g. configs/data/tool-calls/val.jsonl). GENERATED is the output of `pp generate` on that
file: one `{"line": N, "completion": "..."}` per row, N the row's 1-based line in REFERENCE.

A completion is valid when it parses as a JSON object with a string "name" and an object
"arguments"; it is exact when it also equals the reference call (as parsed JSON, so spacing and
key order do not matter). Prints a summary, or with --json one line
`{"rows":N,"valid_json":rate,"exact":rate}`.

Python 3 standard library only.
"""
import argparse
import json
import sys


class ScoreError(Exception):
    pass


def read_jsonl(path):
    """Yields (1-based line number, parsed object) for every non-blank line, as pp reads JSONL."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ScoreError(f"{path}:{number}: not valid JSON ({e})") from None
                if not isinstance(value, dict):
                    raise ScoreError(f"{path}:{number}: a row must be a JSON object")
                yield number, value
    except (OSError, UnicodeDecodeError) as e:
        raise ScoreError(f"cannot read {path}: {e}") from None


def parse_call(text):
    """The tool call in `text`, or None if it is not a JSON object with a name and arguments."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if (isinstance(value, dict) and isinstance(value.get("name"), str)
            and isinstance(value.get("arguments"), dict)):
        return value
    return None


def references(path):
    """Maps each row's line number to its reference tool call."""
    calls = {}
    for number, row in read_jsonl(path):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise ScoreError(f"{path}:{number}: expected a non-empty \"messages\" list")
        last = messages[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise ScoreError(f"{path}:{number}: the last message is not the assistant's answer")
        call = parse_call(last["content"])
        if call is None:
            raise ScoreError(f"{path}:{number}: the reference answer is not a JSON tool call")
        calls[number] = call
    if not calls:
        raise ScoreError(f"{path}: no rows")
    return calls


def score(reference_path, generated_path):
    """Returns (rows scored, valid, exact, reference rows with no generation)."""
    wanted = references(reference_path)
    scored = set()
    valid = exact = 0
    for number, row in read_jsonl(generated_path):
        line, completion = row.get("line"), row.get("completion")
        # `type` rather than isinstance: a JSON `true` is a Python bool, which is an int.
        if type(line) is not int or not isinstance(completion, str):
            raise ScoreError(
                f"{generated_path}:{number}: expected {{\"line\": int, \"completion\": str}}")
        if line not in wanted:
            raise ScoreError(
                f"{generated_path}:{number}: line {line} has no reference in {reference_path}")
        if line in scored:
            raise ScoreError(f"{generated_path}:{number}: line {line} is generated twice")
        scored.add(line)
        call = parse_call(completion)
        valid += call is not None
        exact += call == wanted[line]
    if not scored:
        raise ScoreError(f"{generated_path}: no rows")
    return len(scored), valid, exact, len(wanted) - len(scored)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="the dataset generated from (messages rows)")
    parser.add_argument("generated", help="pp generate's output ({line, completion} rows)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    try:
        rows, valid, exact, missing = score(args.reference, args.generated)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if missing:
        # Scored anyway (a partial run is still informative), but the rates cover fewer rows.
        print(f"warning: {missing} reference rows have no generation", file=sys.stderr)
    if args.json:
        print(json.dumps({"rows": rows, "valid_json": valid / rows, "exact": exact / rows},
                         separators=(",", ":")))
    else:
        print(f"{rows} rows: {valid} valid tool calls ({valid / rows:.1%}), "
              f"{exact} exact ({exact / rows:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
