#!/usr/bin/env python3
"""Checks a running `pp serve` with the official `openai` Python client (installed when missing).

    python3 tests/openai_client.py BASE_URL MODEL API_KEY

Run by tests/serve.rs against a model trained there to answer "weather in Paris?" with the JSON
call {"name":"get_weather","arguments":{"city":"Paris"}} and "say hello" with "Hello there!".
Exits non-zero with the first failed check.
"""
import concurrent.futures
import importlib
import json
import site
import subprocess
import sys
import time
import urllib.error
import urllib.request


def import_openai():
    try:
        return importlib.import_module("openai")
    except ImportError:
        pass
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai"]
    if subprocess.call(pip) != 0:
        # Python builds that forbid installing into the system site-packages (PEP 668).
        subprocess.check_call(pip + ["--user", "--break-system-packages"])
        sys.path.append(site.getusersitepackages())
    importlib.invalidate_caches()
    return importlib.import_module("openai")


openai = import_openai()
BASE, MODEL, KEY = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=120)
END = ["<|im_end|>"]
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def ask(text):
    return [{"role": "user", "content": text}]


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print(f"ok: {what}")


def expect_error(status, call, what):
    try:
        call()
    except openai.APIStatusError as e:
        check(e.status_code == status and isinstance(e.body, dict) and "message" in e.body,
              f"{what}: {status} with an error body ({e.status_code}: {e.body})")
        return e
    raise AssertionError(f"{what}: expected HTTP {status}, the request succeeded")


def raw_post(path, data, key=KEY):
    request = urllib.request.Request(f"{BASE}{path}", data=data, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health():
    with urllib.request.urlopen(f"{BASE}/health", timeout=10) as response:
        return json.loads(response.read())


def main():
    models = [m.id for m in client.models.list().data]
    check(models == [MODEL], f"/v1/models lists {MODEL}")

    # No stop strings: the answer ends at the chat template's end-of-turn token by itself.
    hello = client.chat.completions.create(model=MODEL, messages=ask("say hello"),
                                           temperature=0)
    choice = hello.choices[0]
    check(choice.message.content == "Hello there!" and choice.finish_reason == "stop",
          f"chat answers 'Hello there!' ({choice.message.content!r}, {choice.finish_reason})")
    usage = hello.usage
    check(usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens
          + usage.completion_tokens, f"chat usage adds up ({usage})")

    call = client.chat.completions.create(model=MODEL, messages=ask("weather in Paris?"),
                                          tools=TOOLS, temperature=0)
    choice = call.choices[0]
    calls = choice.message.tool_calls or []
    check(choice.finish_reason == "tool_calls" and len(calls) == 1
          and calls[0].function.name == "get_weather"
          and json.loads(calls[0].function.arguments) == WEATHER["arguments"]
          and calls[0].id and calls[0].type == "function",
          f"a tool call comes back in tool_calls ({choice})")
    plain = client.chat.completions.create(model=MODEL, messages=ask("weather in Paris?"),
                                           temperature=0, stop=END)
    check(plain.choices[0].message.tool_calls is None
          and json.loads(plain.choices[0].message.content) == WEATHER,
          "without tools the same answer stays text")

    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=ask("say hello"),
                                                temperature=0, stop=END, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    check("".join(pieces) == "Hello there!" and finish == "stop" and len(pieces) > 3,
          f"a streamed chat arrives in pieces that make the answer ({pieces})")
    check(usage is not None and usage.completion_tokens == hello.usage.completion_tokens,
          "the stream ends with the usage asked for")

    streamed_calls, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=ask("weather in Paris?"),
                                                tools=TOOLS, temperature=0, stop=END,
                                                stream=True):
        for c in chunk.choices:
            streamed_calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    check(finish == "tool_calls" and len(streamed_calls) == 1
          and json.loads(streamed_calls[0].function.arguments) == WEATHER["arguments"],
          "a streamed tool call arrives as a tool_calls delta")

    text = client.completions.create(model=MODEL, prompt="weather", max_tokens=5, temperature=0)
    check(text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5,
          f"a completion stops at max_tokens ({text.choices[0]})")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="weather", max_tokens=5, temperature=0, stream=True) if c.choices)
    check(streamed == text.choices[0].text, "a streamed completion equals the whole one")

    sampled = client.completions.create(model=MODEL, prompt="weather", max_tokens=8,
                                        temperature=1.0, n=3, seed=11)
    again = client.completions.create(model=MODEL, prompt="weather", max_tokens=8,
                                      temperature=1.0, n=3, seed=11)
    texts = [c.text for c in sampled.choices]
    check(len(texts) == 3 and [c.index for c in sampled.choices] == [0, 1, 2]
          and texts == [c.text for c in again.choices] and len(set(texts)) > 1,
          f"n=3 sampled choices differ and repeat with the seed ({texts})")

    # Several clients at once are decoded in one batch and get what each would alone.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.chat.completions.create(
            model=MODEL, messages=ask("say hello" if i % 2 else "weather in Paris?"),
            temperature=0, stop=END).choices[0].message.content, range(8)))
    check(answers == [json.dumps(WEATHER, separators=(",", ":")), "Hello there!"] * 4,
          "8 concurrent requests each get their own answer")

    # Bad input: an error status with OpenAI's error body, and the server goes on serving.
    expect_error(404, lambda: client.chat.completions.create(model="nope", messages=ask("x")),
                 "an unknown model")
    expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=ask("x"), temperature=5), "temperature 5")
    expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=ask("x"), top_p=0), "top_p 0")
    expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=ask("x"), n=0), "n 0")
    error = expect_error(400, lambda: client.completions.create(
        model=MODEL, prompt="weather " * 400, max_tokens=4), "a prompt longer than --max-len")
    check(error.code == "context_length_exceeded", "it says the context is exceeded")
    expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=[]),
                 "no messages")
    expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=ask("x"), max_tokens=2**63), "max_tokens beyond the context")
    expect_error(400, lambda: client.completions.create(
        model=MODEL, prompt=["weather"] * 10, n=16, max_tokens=2), "160 sequences in one request")
    wrong_key = openai.OpenAI(base_url=f"{BASE}/v1", api_key="wrong", max_retries=0)
    expect_error(401, lambda: wrong_key.models.list(), "a wrong API key")
    status, body = raw_post("/v1/chat/completions", b'{"model": "x", "messages": [')
    check(status == 400 and "error" in body, f"malformed JSON: 400 ({body})")
    status, body = raw_post("/v1/completions", b'{"model": "' + b"x" * (5 << 20) + b'"}')
    check(status == 413 and "error" in body, f"a 5 MiB body: 413 ({status})")
    try:
        urllib.request.urlopen(f"{BASE}/v1/chat/completions", timeout=10)
        raise AssertionError("GET /v1/chat/completions succeeded")
    except urllib.error.HTTPError as e:
        check(e.code == 405 and "error" in json.loads(e.read()), "a GET on a POST endpoint: 405")
    status, body = raw_post("/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "weather", "max_tokens": 2, "stream": None, "echo": None,
         "seed": -5}).encode())
    check(status == 200 and body["usage"]["completion_tokens"] == 2,
          "nulls for defaults and a negative seed are accepted")

    # A client that goes away mid-stream frees its place; the others are unaffected.
    stream = client.chat.completions.create(model=MODEL, messages=ask("say hello"),
                                            temperature=1.0, max_tokens=100, stream=True)
    for _, _ in zip(stream, range(3)):
        pass
    stream.close()
    deadline = time.time() + 30
    while health()["running"] != 0 and time.time() < deadline:
        time.sleep(0.1)
    check(health()["running"] == 0, "an abandoned stream leaves the batch")
    after = client.chat.completions.create(model=MODEL, messages=ask("say hello"),
                                           temperature=0, stop=END)
    check(after.choices[0].message.content == "Hello there!", "the server still answers")
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
