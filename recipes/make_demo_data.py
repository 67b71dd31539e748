"""Generate the bundled demo data sets in ``mlx_lora/demo_data/`` (original text, fixed seeds).

    python recipes/make_demo_data.py            # rewrite mlx_lora/demo_data/
    python recipes/make_demo_data.py --out DIR  # write elsewhere (the tests compare the two)

Every row is built from templates and tables in this file with ``random.Random(seed)``, so the
output is identical on every machine and Python version (``random.Random`` with an int seed and
``choice``/``randrange``/``shuffle`` are stable across versions). Nothing is scraped or copied.

Data sets (one per recipe family, small enough for tests to run a recipe for a few steps):

- ``triage/`` (chat, with a system prompt): route a customer-support ticket to ``team/priority``.
  The quickstart's task: a 135M instruct model cannot do it before fine-tuning (it answers in
  prose) and learns it from a few hundred examples. The test split also uses ticket phrasings and
  priority wordings that never occur in train, so it measures more than memorisation.
- ``instruct.jsonl`` (alpaca): small deterministic text and number tasks.
- ``chat.jsonl`` (chat, multi-turn): a bicycle-rental assistant that quotes prices over 2-3 turns.
- ``summarize.jsonl`` (completions): long service agreements -> a three-sentence summary.
- ``code.jsonl`` (alpaca): short Python functions from a one-line specification.
- ``text.jsonl`` (text): field-guide paragraphs about invented plants (continued pretraining).
- ``preference.jsonl`` (preference, chat): arithmetic questions; the chosen reply states the right
  sum in a full sentence, the rejected one a wrong sum or an unhelpful brush-off (DPO, ORPO).
- ``arithmetic/`` (GRPO prompts: ``prompt`` as chat messages, ``answer``): small sums and
  differences with a checkable answer. valid.jsonl and test.jsonl hold problems train.jsonl never
  asks (no pair of operands and operator occurs in two splits).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlx_lora" / "demo_data"

# ---------------------------------------------------------------------------------------------
# triage: the quickstart task

TRIAGE_SYSTEM = (
    "Route the support ticket. Reply with team/priority only. Teams: billing, shipping, tech, account. "
    "Priority: urgent if the customer needs it fixed now, low if they say it can wait, else normal."
)
TEAMS = ("billing", "shipping", "tech", "account")
PRIORITIES = ("urgent", "normal", "low")

# Ticket bodies per team. The last two of each list appear only in the test split.
TICKETS = {
    "billing": [
        "I was charged twice for order {order}.",
        "My card was billed {amount} but the invoice says {amount2}.",
        "Can I get a refund for the {product} I sent back last week?",
        "Please send me a VAT invoice for order {order}.",
        "Why did my subscription renew at {amount} instead of {amount2}?",
        "The payment for order {order} failed but the money left my bank account.",
        "I want to switch from monthly to yearly billing.",
        "There is a charge of {amount} on my statement that I don't recognise.",
        "Your website took {amount} for a {product} I never ordered.",
        "I need a receipt for the {amount} I paid on {day}.",
        "The discount code was not applied and I paid {amount} for the {product}.",
        "Could you split the cost of order {order} across two cards?",
    ],
    "shipping": [
        "My {product} still hasn't arrived, tracking for order {order} shows no update since {day}.",
        "The box with my {product} arrived crushed.",
        "Can you ship order {order} to my office instead of my home?",
        "The courier left order {order} at the wrong address.",
        "Tracking says delivered but there is no {product} at my door.",
        "How long does delivery to {city} usually take?",
        "Only half of order {order} came; the {product} is missing.",
        "Can I pick up order {order} from the depot in {city}?",
        "The delivery van came on {day} but nobody rang the bell.",
        "Please hold order {order} at the post office until I am back.",
        "The parcel for order {order} is stuck at customs in {city}.",
        "I received someone else's package instead of my {product}.",
    ],
    "tech": [
        "The app crashes every time I open the {product} settings page.",
        "My {product} won't connect to wifi after the last update.",
        "I get error {code} when I try to sync my {product}.",
        "The {product} firmware update is stuck at {pct} percent.",
        "The web dashboard shows a blank page in my browser.",
        "Bluetooth pairing with the {product} keeps failing.",
        "The {product} turns off by itself after a few minutes.",
        "Exporting my data gives error {code}.",
        "The {product} does not show up in the app anymore.",
        "After the update the {product} battery drains within an hour.",
        "The screen of my {product} flickers since this morning.",
        "Notifications from the {product} app stopped arriving on my phone.",
    ],
    "account": [
        "Please change the email on my account to {email}.",
        "I can't reset my password, the link never arrives.",
        "How do I delete my account and all my data?",
        "Someone else logged into my account from {city}.",
        "Please add my colleague {name} as a second user on our account.",
        "I want to change the name on my account to {name}.",
        "My account got locked after too many login attempts.",
        "Can you merge my two accounts into the one using {email}?",
        "I never received the verification email for my new account.",
        "Please remove {name} from our account, they left the company.",
        "Two-factor codes are going to my old phone number.",
        "Please transfer ownership of our team account to {name}.",
    ],
}
# How each priority is expressed. {t} is the ticket, {tl} the ticket with a lower-case first letter.
# The last wording of each list appears only in the test split.
WRAPPERS = {
    "urgent": [
        "URGENT: {t}",
        "{t} I need this sorted today!",
        "{t} This is blocking our whole team, please help right away.",
        "{t} Please fix this immediately.",
        "Help asap! {t}",
        "{t} Our customers are waiting, this is critical.",
        "Top priority please. {t}",
        "{t} It is an emergency, we cannot wait.",
    ],
    "normal": [
        "{t}",
        "Hi, {tl}",
        "{t} Thanks.",
        "Hello team. {t}",
        "{t} Regards, {name}",
        "Hi there, {tl} Cheers",
        "Dear support, {tl}",
        "Good afternoon, {tl} Best, {name}",
    ],
    "low": [
        "No rush, but {tl}",
        "{t} Whenever you get a chance, thanks.",
        "Just a small question for later: {tl}",
        "{t} Not urgent at all.",
        "{t} Reply any time this week is fine.",
        "Low priority: {tl}",
        "{t} No hurry, it can wait.",
        "{t} Low priority, it can wait until next month.",
    ],
}
HELD_OUT_TICKETS, HELD_OUT_WRAPPERS = 2, 1
PRODUCTS = (
    "Lumo desk lamp",
    "Brewster kettle",
    "Pathfinder watch",
    "Nimbus speaker",
    "Quill tablet",
    "Orbit camera",
    "Tidy vacuum",
    "Ember heater",
    "Drift scooter",
    "Harbor router",
)
NAMES = ("Amara", "Jonas", "Priya", "Tomasz", "Lucia", "Kenji", "Fatima", "Oskar", "Mei", "Diego", "Ines", "Kwame")
CITIES = ("Leeds", "Porto", "Lyon", "Graz", "Turku", "Cork", "Ghent", "Bergen", "Brno", "Malmo")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
TRIAGE_SPLITS = (("train", 480, 11), ("valid", 40, 12), ("test", 120, 13))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fill(template: str, rng: random.Random) -> str:
    a = rng.randrange(5, 300)
    return template.format(
        order=f"#{rng.randrange(10000, 99999)}",
        amount=f"${a}.{rng.randrange(100):02d}",
        amount2=f"${a + rng.randrange(1, 50)}.00",
        product=rng.choice(PRODUCTS),
        day=rng.choice(DAYS),
        city=rng.choice(CITIES),
        code=f"E{rng.randrange(100, 999)}",
        pct=rng.randrange(10, 95),
        email=f"{rng.choice(NAMES).lower()}{rng.randrange(10, 99)}@example.com",
        name=rng.choice(NAMES),
    )


def triage_ticket(rng: random.Random, held_out: bool) -> tuple[str, str]:
    """(ticket text, "team/priority"). ``held_out`` draws from every phrasing, else only from the
    training phrasings."""
    team, priority = rng.choice(TEAMS), rng.choice(PRIORITIES)
    bodies = TICKETS[team] if held_out else TICKETS[team][:-HELD_OUT_TICKETS]
    wrappers = WRAPPERS[priority] if held_out else WRAPPERS[priority][:-HELD_OUT_WRAPPERS]
    body = _fill(rng.choice(bodies), rng)
    text = rng.choice(wrappers).format(t=body, tl=body[0].lower() + body[1:], name=rng.choice(NAMES))
    return text, f"{team}/{priority}"


def triage_rows(n: int, seed: int, held_out: bool) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        text, label = triage_ticket(rng, held_out)
        if text in seen:
            continue
        seen.add(text)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": TRIAGE_SYSTEM},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    return rows


def triage_splits() -> dict[str, list[dict]]:
    splits = {name: triage_rows(n, seed, held_out=(name == "test")) for name, n, seed in TRIAGE_SPLITS}
    # No ticket of the evaluation splits may occur in train.
    train = {r["messages"][1]["content"] for r in splits["train"]}
    for name in ("valid", "test"):
        splits[name] = [r for r in splits[name] if r["messages"][1]["content"] not in train]
    return splits


# ---------------------------------------------------------------------------------------------
# instruct (alpaca)

_ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_WORDS = ("pear", "apple", "fig", "plum", "kiwi", "lime", "mango", "grape", "melon", "cherry", "date", "quince")
_IRREGULAR = {
    "mouse": "mice",
    "goose": "geese",
    "child": "children",
    "tooth": "teeth",
    "foot": "feet",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "man": "men",
}


def number_words(n: int) -> str:
    """English words for 0 <= n < 100."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def instruct_rows(n: int = 48, seed: int = 21) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            c = rng.randrange(-20, 41)
            f = c * 9 / 5 + 32
            rows.append(
                {
                    "instruction": "Convert the temperature from Celsius to Fahrenheit.",
                    "input": f"{c} °C",
                    "output": f"{f:g} °F",
                }
            )
        elif kind == 1:
            words = rng.sample(_WORDS, rng.randrange(3, 6))
            rows.append(
                {
                    "instruction": "Sort the words alphabetically.",
                    "input": ", ".join(words),
                    "output": ", ".join(sorted(words)),
                }
            )
        elif kind == 2:
            k = rng.randrange(0, 100)
            rows.append({"instruction": "Write the number in words.", "input": str(k), "output": number_words(k)})
        elif kind == 3:
            noun = rng.choice(sorted(_IRREGULAR))
            rows.append(
                {"instruction": f"Give the plural of the noun '{noun}'.", "input": "", "output": _IRREGULAR[noun]}
            )
        elif kind == 4:
            words = rng.sample(_WORDS, rng.randrange(3, 7))
            sentence = "I bought " + ", ".join(words[:-1]) + " and " + words[-1] + "."
            rows.append(
                {
                    "instruction": "Count the words in the sentence.",
                    "input": sentence,
                    "output": str(len(sentence.split())),
                }
            )
        else:
            start = rng.randrange(1, 90)
            evens = [x for x in range(start + 1, start + 8) if x % 2 == 0][:3]
            rows.append(
                {
                    "instruction": f"List three even numbers greater than {start}.",
                    "input": "",
                    "output": ", ".join(map(str, evens)),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# chat (multi-turn)

_BIKES = {"city bike": 6, "e-bike": 14, "tandem": 11, "cargo bike": 12}
_EXTRAS = {"helmet": 2, "child seat": 3, "lock": 1}
CHAT_SYSTEM = (
    "You are the assistant of the Riverside bicycle rental. Prices per hour: "
    + ", ".join(f"{b} ${p}" for b, p in _BIKES.items())
    + ". Extras per hour: "
    + ", ".join(f"{e} ${p}" for e, p in _EXTRAS.items())
    + ". Answer briefly."
)


def chat_rows(n: int = 32, seed: int = 31) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        bike = rng.choice(sorted(_BIKES))
        hours = rng.randrange(1, 9)
        extra = rng.choice(sorted(_EXTRAS))
        base = _BIKES[bike] * hours
        with_extra = base + _EXTRAS[extra] * hours
        msgs = [
            {"role": "system", "content": CHAT_SYSTEM},
            {"role": "user", "content": f"How much is a {bike} for {hours} hour{'s' * (hours > 1)}?"},
            {"role": "assistant", "content": f"A {bike} for {hours} hour{'s' * (hours > 1)} costs ${base}."},
            {"role": "user", "content": f"And with a {extra}?"},
            {
                "role": "assistant",
                "content": f"With a {extra} it is ${with_extra} in total (${base} + ${_EXTRAS[extra] * hours}).",
            },
        ]
        if rng.random() < 0.5:
            people = rng.randrange(2, 5)
            msgs += [
                {"role": "user", "content": f"We are {people} people, each wants the same."},
                {
                    "role": "assistant",
                    "content": f"For {people} people that is {people} x ${with_extra} = ${people * with_extra}.",
                },
            ]
        rows.append({"messages": msgs})
    return rows


# ---------------------------------------------------------------------------------------------
# summarize (completions, long inputs)

_FIRMS = (
    "Alder & Finch Ltd",
    "Brightwater Logistics",
    "Cobalt Orchard Farms",
    "Dunmore Print Works",
    "Elmstead Dental Group",
    "Fairhaven Robotics",
    "Greystone Bakery Co",
    "Hollins Marine Supply",
)
_SERVICES = (
    "cleaning of office premises",
    "maintenance of delivery vans",
    "hosting of the customer website",
    "payroll processing",
    "security patrols of the warehouse",
    "translation of product manuals",
)
_REGIONS = ("the Northern Province", "the Coastal District", "the Central Territory", "the Eastern Shire")
SUMMARIZE_INSTRUCTION = "Summarize the agreement in three sentences: parties and service, term and fee, termination."


def _agreement(rng: random.Random) -> tuple[str, str]:
    provider, client = rng.sample(_FIRMS, 2)
    service = rng.choice(_SERVICES)
    months = rng.choice((6, 12, 18, 24, 36))
    fee = rng.randrange(8, 90) * 100
    notice = rng.choice((14, 30, 60, 90))
    late = rng.choice((1, 1.5, 2))
    region = rng.choice(_REGIONS)
    cap = rng.choice((2, 3, 5))
    clauses = [
        f"SERVICE AGREEMENT\n\nThis agreement is made between {provider} (the Provider) and {client} (the Client).",
        f"1. Services. The Provider shall carry out the {service} as described in the schedule attached to this "
        f"agreement, using suitably trained staff and its own equipment unless the schedule states otherwise.",
        f"2. Term. This agreement starts on the first day of the month following signature and runs for {months} "
        f"months. It renews for further periods of twelve months unless either party gives notice under clause 9.",
        f"3. Fees. The Client shall pay a fee of ${fee:,} per month, invoiced at the start of each month and payable "
        f"within thirty days of the invoice date.",
        f"4. Late payment. Overdue amounts carry interest at {late}% per month from the due date until payment is "
        f"received in full.",
        "5. Standards. The Provider shall perform the services with reasonable skill and care and in accordance "
        "with all applicable laws, and shall keep records of the work done for at least two years.",
        "6. Access. The Client shall give the Provider reasonable access to its premises and systems during normal "
        "working hours and shall tell the Provider in advance of any safety rules that apply.",
        "7. Confidentiality. Each party shall keep confidential any information it receives from the other party "
        "that is marked as confidential or that a reasonable person would treat as confidential.",
        f"8. Liability. The total liability of the Provider under this agreement is limited to {cap} times the "
        f"monthly fee, except for liability that cannot be limited by law.",
        f"9. Termination. Either party may end this agreement by giving {notice} days' written notice. Either party "
        f"may end it at once if the other party commits a serious breach and does not remedy it within fourteen days.",
        "10. Notices. Notices must be in writing and sent to the address of the other party shown above or to any "
        "other address that party has given for this purpose.",
        f"11. Governing law. This agreement is governed by the laws of {region}, and its courts have exclusive "
        f"jurisdiction over any dispute arising from it.",
    ]
    document = "\n\n".join(clauses)
    summary = (
        f"{provider} provides {service} to {client}. The agreement runs for {months} months, renewing "
        f"yearly, at ${fee:,} per month. Either party may terminate with {notice} days' written notice."
    )
    return document, summary


def summarize_rows(n: int = 16, seed: int = 41) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        document, summary = _agreement(rng)
        rows.append({"prompt": f"{SUMMARIZE_INSTRUCTION}\n\n{document}\n\nSummary:", "completion": " " + summary})
    return rows


# ---------------------------------------------------------------------------------------------
# code (alpaca)

# (name, arguments, specification, body lines); {k} is a per-row constant.
_FUNCTIONS = (
    ("clamp", "x, lo, hi", "limits x to the range [lo, hi]", ["return max(lo, min(x, hi))"]),
    (
        "count_vowels",
        "text",
        "returns how many vowels (a, e, i, o, u, either case) text contains",
        ['return sum(1 for ch in text.lower() if ch in "aeiou")'],
    ),
    ("is_multiple", "n", "returns True when n is a multiple of {k}", ["return n % {k} == 0"]),
    (
        "add_tax",
        "price",
        "returns price plus {k}% tax, rounded to 2 decimals",
        ["return round(price * (1 + {k} / 100), 2)"],
    ),
    (
        "first_words",
        "text",
        "returns the first {k} words of text joined by single spaces",
        ['return " ".join(text.split()[:{k}])'],
    ),
    (
        "chunk",
        "items",
        "splits the list items into consecutive lists of length {k} (the last may be shorter)",
        ["return [items[i:i + {k}] for i in range(0, len(items), {k})]"],
    ),
    (
        "running_total",
        "numbers",
        "returns the list of running sums of numbers",
        ["total, out = 0, []", "for x in numbers:", "    total += x", "    out.append(total)", "return out"],
    ),
    (
        "safe_div",
        "a, b",
        "divides a by b and returns {k} when b is zero",
        ["if b == 0:", "    return {k}", "return a / b"],
    ),
)


def code_rows(n: int = 32, seed: int = 51) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, args, spec, body = _FUNCTIONS[i % len(_FUNCTIONS)]
        k = rng.randrange(2, 10)
        spec = spec.format(k=k)
        code = f"def {name}({args}):\n" + "\n".join("    " + line.format(k=k) for line in body)
        rows.append(
            {
                "instruction": f"Write a Python function `{name}({args})` that {spec}.",
                "input": "",
                "output": f"```python\n{code}\n```",
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# text (continued pretraining)

_GENERA = ("Velloria", "Quintara", "Mossbell", "Tarrowin", "Ashlume", "Corrigan", "Fennistar", "Lowmire")
_HABITATS = ("limestone ridges", "salt marshes", "birch woodland", "scree slopes", "river gravel", "peat bogs")
_COLOURS = ("violet", "pale yellow", "deep red", "white", "blue-grey", "orange")
_SEASONS = ("early spring", "midsummer", "late autumn", "the first frosts")


def text_rows(n: int = 40, seed: int = 61) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        genus = rng.choice(_GENERA)
        species = rng.choice(("minor", "alpina", "ripensis", "grandis", "nocturna", "vulgaris"))
        height = rng.randrange(5, 120)
        altitude = rng.randrange(0, 2400, 50)
        text = (
            f"{genus} {species} grows on {rng.choice(_HABITATS)} up to {altitude} metres above sea level. "
            f"It reaches {height} cm and flowers in {rng.choice(_SEASONS)}, with {rng.choice(_COLOURS)} petals "
            f"arranged in groups of {rng.randrange(3, 8)}. "
            f"The leaves are {rng.choice(('narrow', 'heart-shaped', 'lobed', 'waxy'))} "
            f"and the seeds are spread by {rng.choice(('wind', 'birds', 'water', 'ants'))}. "
            f"Field workers recognise it by its "
            f"{rng.choice(('sharp scent', 'hairy stem', 'red veins', 'curled tips'))}."
        )
        rows.append({"text": text})
    return rows


# ---------------------------------------------------------------------------------------------
# preference: prompt / chosen / rejected

BRUSH_OFFS = ("Work it out yourself.", "I would rather not say.", "That is too hard to answer.", "Ask someone else.")


def preference_rows(n: int = 40, seed: int = 71) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        op, word = rng.choice(((lambda x, y: x + y, "plus"), (lambda x, y: x * y, "times")))
        right = op(a, b)
        wrong = right + rng.choice((-10, -2, -1, 1, 2, 10))
        question = rng.choice(("What is {a} {w} {b}?", "Please compute {a} {w} {b}.", "{a} {w} {b} = ?"))
        rejected = f"{a} {word} {b} is {wrong}." if rng.random() < 0.6 else rng.choice(BRUSH_OFFS)
        out.append(
            {
                "prompt": [{"role": "user", "content": question.format(a=a, w=word, b=b)}],
                "chosen": [{"role": "assistant", "content": f"{a} {word} {b} is {right}."}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# arithmetic: GRPO prompts with a verifiable answer

ARITHMETIC_ASKS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Work out {a} {op} {b}.")
ARITHMETIC_SIZES = {"train": 320, "valid": 40, "test": 60}


def arithmetic_splits(seed: int = 27) -> dict[str, list[dict]]:
    """Addition and subtraction of numbers up to 20 (no negative results): a user turn asking the
    question and the start of the assistant's reply, which restates the problem up to ``=``; the
    completion goes on from there, so its first number is the model's result. ``answer`` is the
    result as text. The splits never share a problem."""
    rng = random.Random(seed)
    problems = [(a, op, b) for a in range(1, 21) for b in range(1, 21) for op in ("+", "-") if op == "+" or a >= b]
    rng.shuffle(problems)
    out, start = {}, 0
    for name, n in ARITHMETIC_SIZES.items():
        rows = []
        for a, op, b in problems[start : start + n]:
            ask = rng.choice(ARITHMETIC_ASKS).format(a=a, op=op, b=b)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": ask}, {"role": "assistant", "content": f"{a} {op} {b} ="}],
                    "answer": str(a + b if op == "+" else a - b),
                }
            )
        out[name], start = rows, start + n
    return out


# ---------------------------------------------------------------------------------------------
# writing


def all_files() -> dict[str, list[dict]]:
    """Relative path -> rows, for every bundled file."""
    files = {f"triage/{name}.jsonl": rows for name, rows in triage_splits().items()}
    files.update({f"arithmetic/{name}.jsonl": rows for name, rows in arithmetic_splits().items()})
    files.update(
        {
            "instruct.jsonl": instruct_rows(),
            "chat.jsonl": chat_rows(),
            "summarize.jsonl": summarize_rows(),
            "code.jsonl": code_rows(),
            "text.jsonl": text_rows(),
            "preference.jsonl": preference_rows(),
        }
    )
    return files


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(out: Path) -> list[Path]:
    from mlx_lora.plumbing.io import atomic_write_text

    written = []
    for rel, rows in all_files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, jsonl(rows))
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    for path in write(args.out):
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
