#!/usr/bin/env python3
"""Generates the small tool-calling chat dataset used by the demo.

Each row is one JSON line `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`:
a short request ("weather in Paris tomorrow?") and, as the assistant's answer, a compact JSON
tool call (`{"name":"get_weather","arguments":{"city":"Paris","day":"tomorrow"}}`).

    python3 scripts/make_tool_calls.py [--seed 0] [--train 2000] [--val 200] [--out DIR]

Validation measures generalisation rather than recall: every open-ended slot (cities, amounts,
times, tasks, phrases, contacts, ...) has its values split once, by the seed, into a training
pool and a validation-only pool, so each validation row asks for a value never seen in that slot
during training. Closed vocabularies (days, currencies, units, languages) are shared, since a
mapping such as "yen" -> "JPY" cannot be inferred from examples that never show it.

No system message: the demo model (tests/fixtures/llama3-tiny/hf) has 128 positions and every
token spent on instructions is one fewer for the request and the answer.

Python 3 standard library only; `tokenizers`, if installed, is used to check the token budget.
"""
import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests/fixtures/llama3-tiny/hf/tokenizer.json"

# A rendered conversation must fit the demo model's 128 positions with room to spare.
MAX_TOKENS = 120
# Always applied, and the only limit when `tokenizers` is not installed: at most this many
# characters in the rendered conversation. With the demo tokenizer these rows run at 1.77 to 2.5
# characters per token, so 200 characters is at most about 113 tokens; the token check then never
# rejects a row, and the output is the same with or without `tokenizers`.
MAX_CHARS = 200

DAYS = ["today", "tomorrow", "monday", "tuesday", "wednesday", "thursday", "friday",
        "saturday", "sunday"]
CURRENCIES = {
    "USD": ["usd", "USD", "dollars", "us dollars"],
    "EUR": ["eur", "EUR", "euros"],
    "GBP": ["gbp", "GBP", "pounds", "british pounds"],
    "JPY": ["jpy", "JPY", "yen"],
    "CHF": ["chf", "swiss francs"],
    "CAD": ["cad", "canadian dollars"],
    "INR": ["inr", "rupees"],
    "AUD": ["aud", "australian dollars"],
}
# Canonical unit -> (singular, plural) words the user may write.
UNITS = {"seconds": ("second", "seconds"), "minutes": ("minute", "minutes"),
         "hours": ("hour", "hours")}
LANGUAGES = {"french": "fr", "spanish": "es", "german": "de", "italian": "it",
             "japanese": "ja", "portuguese": "pt", "dutch": "nl", "korean": "ko"}

# Open-ended slot values; each list is split into training and validation-only pools.
OPEN = {
    "city": ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Oslo", "Lisbon", "Dublin",
             "Vienna", "Prague", "Warsaw", "Athens", "Cairo", "Lagos", "Nairobi", "Toronto",
             "Chicago", "Boston", "Denver", "Seattle", "Miami", "Austin", "Lima", "Bogota",
             "Santiago", "Sydney", "Perth", "Auckland", "Seoul", "Osaka", "Delhi", "Mumbai",
             "Dubai", "Istanbul", "Zurich", "Geneva", "Munich", "Hamburg", "Milan"],
    "money": [5, 10, 12, 15, 20, 25, 30, 40, 45, 50, 60, 75, 80, 90, 99, 100, 120, 150, 200,
              250, 300, 350, 400, 500, 600, 750, 800, 1000, 1200, 1500, 2000, 2500, 5000,
              7.5, 12.5, 19.99, 49.5, 9.99, 0.5, 3.25],
    "count": list(range(1, 61)) + [75, 90, 100, 120],
    "time": [f"{h}{m}{ampm}" for h in range(1, 13) for m in ("", ":15", ":30", ":45")
             for ampm in ("am", "pm")] + ["noon", "midnight"],
    "task": ["call mom", "buy milk", "take out the trash", "water the plants", "pay rent",
             "feed the cat", "walk the dog", "book the dentist", "send the report",
             "pick up the kids", "check the oven", "renew my passport", "email Sarah",
             "take my pills", "charge my phone", "lock the door", "call the bank",
             "buy bread", "pack my bag", "back up my laptop", "order pizza",
             "return the library books", "text Alex", "clean the kitchen", "go for a run",
             "submit the form", "buy a birthday card", "call grandma", "move the car",
             "stretch", "buy eggs", "cancel the gym", "pay the phone bill", "call dad",
             "wash the car", "iron my shirt"],
    "genre": ["jazz", "rock", "blues", "classical", "hip hop", "reggae", "techno", "folk",
              "country", "metal", "soul", "disco", "punk", "lofi", "salsa", "funk", "opera",
              "ambient", "house", "gospel"],
    "artist": ["Adele", "Miles Davis", "Queen", "Beyonce", "Bob Marley", "Nina Simone",
               "Daft Punk", "Taylor Swift", "Radiohead", "Bach", "Mozart", "Drake", "Shakira",
               "Coldplay", "Metallica", "Prince", "Madonna", "Bjork", "Rihanna", "ABBA"],
    "phrase": ["hello", "good morning", "thank you", "where is the station", "how much is this",
               "I love you", "see you tomorrow", "good night", "the bill please", "one coffee",
               "happy birthday", "excuse me", "nice to meet you", "what time is it", "I am lost",
               "goodbye", "how are you", "welcome", "my name is Sam", "I am hungry",
               "where is the toilet", "two beers", "I do not understand", "left or right",
               "help", "good luck", "congratulations", "sorry", "water please", "cheers"],
    "contact": ["mom", "dad", "Sam", "Alex", "Maria", "John", "Priya", "Chen", "Laura", "Tom",
                "grandma", "Lucas", "Emma", "Omar", "Zoe", "Ben", "Nina", "Ravi", "my boss",
                "Kate"],
    "message": ["running late", "on my way", "see you soon", "dinner is ready", "call me back",
                "I am home", "happy birthday", "meeting moved to 3", "bring snacks",
                "good luck today", "thanks for lunch", "I will be there at 8", "miss you",
                "where are you", "almost there", "can we talk later", "leaving now",
                "the door is open", "got the tickets", "love you"],
}
VAL_SHARE = 0.2


def split_pools(rng):
    """Splits every open slot's values into (train, val) pools, VAL_SHARE of them to val."""
    pools = {}
    for slot, values in OPEN.items():
        shuffled = list(values)
        rng.shuffle(shuffled)
        cut = max(1, round(len(shuffled) * VAL_SHARE))
        pools[slot] = {"val": shuffled[:cut], "train": shuffled[cut:]}
    return pools


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


# Each tool takes (rng, pick) where pick(slot) draws a value from the current split's pool, and
# returns (user prompt, tool call). Templates are plain str.format strings.

def weather(rng, pick):
    city, day = pick("city"), rng.choice(DAYS)
    if day == "today":
        when = rng.choice(["today", "right now", ""])
    elif day == "tomorrow":
        when = "tomorrow"
    else:
        when = rng.choice([f"on {day}", day])
    template = rng.choice([
        "weather in {city} {when}?", "what's the weather like in {city} {when}",
        "will it rain in {city} {when}?", "forecast for {city} {when}",
        "how hot will it be in {city} {when}?", "is it going to be sunny in {city} {when}?",
        "{city} weather {when}", "do I need an umbrella in {city} {when}?",
    ])
    return template.format(city=city, when=when), call("get_weather", city=city, day=day)


def currency(rng, pick):
    amount = pick("money")
    source, target = rng.sample(sorted(CURRENCIES), 2)
    template = rng.choice([
        "convert {n} {a} to {b}", "how much is {n} {a} in {b}?", "{n} {a} to {b}",
        "what is {n} {a} in {b}", "exchange {n} {a} into {b}",
        "how many {b} do I get for {n} {a}?",
    ])
    prompt = template.format(n=amount, a=rng.choice(CURRENCIES[source]),
                             b=rng.choice(CURRENCIES[target]))
    return prompt, call("convert_currency", amount=amount, **{"from": source, "to": target})


def timer(rng, pick):
    count, unit = pick("count"), rng.choice(sorted(UNITS))
    singular, plural = UNITS[unit]
    word = singular if count == 1 else plural
    template = rng.choice([
        "set a timer for {n} {u}", "timer {n} {u}", "start a {n} {s} timer",
        "count down {n} {u}", "can you time {n} {u} for me?", "{n} {u} timer please",
    ])
    prompt = template.format(n=count, u=word, s=singular)
    return prompt, call("set_timer", duration=count, unit=unit)


def reminder(rng, pick):
    task, time = pick("task"), pick("time")
    template = rng.choice([
        "remind me to {task} at {time}", "at {time} remind me to {task}",
        "set a reminder to {task} at {time}", "don't let me forget to {task} at {time}",
        "reminder: {task} at {time}", "I need to {task} at {time}, remind me",
    ])
    return template.format(task=task, time=time), call("create_reminder", task=task, time=time)


def alarm(rng, pick):
    time = pick("time")
    template = rng.choice([
        "set an alarm for {time}", "wake me up at {time}", "alarm at {time}",
        "I need to be up at {time}", "set my alarm to {time}", "alarm for {time} please",
    ])
    return template.format(time=time), call("set_alarm", time=time)


def music(rng, pick):
    # Genre and artist requests use different argument names; their templates are kept
    # distinguishable ("some ... music" against "by ...") so the key follows from the wording.
    if rng.random() < 0.5:
        genre = pick("genre")
        template = rng.choice([
            "play some {g}", "put on some {g} music", "I want to hear some {g}",
            "can you play {g} music?", "start a {g} playlist",
        ])
        return template.format(g=genre), call("play_music", genre=genre)
    artist = pick("artist")
    template = rng.choice([
        "play something by {a}", "play songs by {a}", "I want to listen to {a}", "put on {a}",
        "shuffle {a}",
    ])
    return template.format(a=artist), call("play_music", artist=artist)


def translate(rng, pick):
    text, language = pick("phrase"), rng.choice(sorted(LANGUAGES))
    template = rng.choice([
        "translate {t} to {l}", "how do you say {t} in {l}?", "what's {t} in {l}",
        "say {t} in {l}", "translate \"{t}\" into {l}", "{t} in {l} please",
    ])
    prompt = template.format(t=text, l=rng.choice([language, language.capitalize()]))
    return prompt, call("translate", text=text, target=LANGUAGES[language])


def message(rng, pick):
    contact, text = pick("contact"), pick("message")
    template = rng.choice([
        "text {c}: {m}", "send {c} a message saying {m}", "message {c} {m}",
        "tell {c} {m}", "send a text to {c}: {m}",
    ])
    return template.format(c=contact, m=text), call("send_message", to=contact, text=text)


TOOLS = [weather, currency, timer, reminder, alarm, music, translate, message]


def token_counter():
    """Returns a function counting a rendered conversation's tokens, or None without tokenizers."""
    try:
        import tokenizers
    except ImportError:
        return None
    tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    # Like pp and transformers' apply_chat_template: no special tokens beyond the template's.
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def render(messages):
    """The demo model's chat template (chat_template.jinja), applied to every message."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def make_rows(rng, pick, count, seen, fits):
    """`count` new rows whose prompts are not in `seen` (which is updated) and that fit."""
    rows = []
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > count * 100:
            sys.exit(f"error: could not make {count} distinct rows that fit; ask for fewer")
        prompt, tool_call = rng.choice(TOOLS)(rng, pick)
        prompt = " ".join(prompt.split()).replace(" ?", "?")  # an empty slot leaves spaces
        if rng.random() < 0.5:
            prompt = prompt[0].upper() + prompt[1:]
        if prompt in seen:
            continue
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": json.dumps(tool_call, separators=(",", ":"))},
        ]
        if not fits(render(messages)):
            continue
        seen.add(prompt)
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="training rows")
    parser.add_argument("--val", type=int, default=200, help="validation rows")
    parser.add_argument("--out", type=Path, default=Path("configs/data/tool-calls"))
    args = parser.parse_args()

    rng = random.Random(args.seed)
    pools = split_pools(rng)
    count_tokens = token_counter()
    if count_tokens is None:
        print(f"tokenizers not installed: limiting rows to {MAX_CHARS} characters",
              file=sys.stderr)
        fits = lambda text: len(text) <= MAX_CHARS
    else:
        fits = lambda text: len(text) <= MAX_CHARS and count_tokens(text) <= MAX_TOKENS

    seen = set()
    splits = {}
    for split, count in (("train", args.train), ("val", args.val)):
        pick = lambda slot, split=split: rng.choice(pools[slot][split])
        splits[split] = make_rows(rng, pick, count, seen, fits)

    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(args.out / f"{split}.jsonl", rows)
        summary = f"{args.out / split}.jsonl: {len(rows)} rows"
        if count_tokens is not None:
            lengths = [count_tokens(render(row["messages"])) for row in rows]
            summary += f", tokens max {max(lengths)} mean {sum(lengths) / len(lengths):.1f}"
        print(summary)


if __name__ == "__main__":
    main()
