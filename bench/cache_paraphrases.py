"""The semantic cache's paraphrase set: questions that mean the same, and look-alikes that do not.

Written for this project (no benchmark's questions): each template below asks one thing in two or
three wordings, with a slot. Pairs:

* paraphrase: two wordings of a template, same slot value (a hit is right);
* entity: two wordings, different slot values (a city, a language, a product, a person...);
* number: the same with a different number;
* negation: a wording against its negated or reversed form (from/to swapped, "not", "without");
* order: the two slot values swapped (convert A to B vs B to A).

Templates are split in two halves by position (even: pick, odd: check): the threshold is picked on
the first, and the false-hit and hit rates are reported on both (bench/cache_threshold.py).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

CITIES = ["Paris", "Berlin", "Tokyo", "Nairobi", "Lima", "Toronto", "Madrid", "Oslo", "Cairo", "Seoul"]
LANGUAGES = ["Python", "Rust", "Java", "Go", "JavaScript", "C++", "Ruby", "Kotlin"]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Norway", "Mexico"]
PRODUCTS = ["iPhone", "Pixel", "Kindle", "PlayStation", "Thinkpad", "Galaxy tablet", "Apple Watch"]
PEOPLE = ["Marie Curie", "Alan Turing", "Ada Lovelace", "Isaac Newton", "Nikola Tesla", "Charles Darwin"]
UNITS = ["Celsius", "Fahrenheit", "Kelvin"]
CURRENCIES = ["euros", "US dollars", "yen", "British pounds", "Swiss francs"]
FOODS = ["lasagna", "pad thai", "banana bread", "risotto", "chili con carne", "pancakes"]
ANIMALS = ["cats", "dogs", "rabbits", "parrots", "hamsters", "horses"]
DATABASES = ["PostgreSQL", "MySQL", "MongoDB", "SQLite", "Redis", "Cassandra"]
NUMBERS = ["3", "5", "7", "12", "20", "48", "100", "250"]


@dataclass(frozen=True)
class Template:
    forms: tuple[str, ...]  # wordings of one question; {x} the slot ({y} a second one for order)
    values: tuple[str, ...]
    negated: str | None = None  # a wording that asks the opposite (same slot)
    kind: str = "entity"  # what a different slot value makes: entity | number


T = Template
TEMPLATES: tuple[Template, ...] = (
    T(
        ("What is the population of {x}?", "How many people live in {x}?", "How big is {x}'s population?"),
        tuple(CITIES),
    ),
    T(
        ("What's the weather usually like in {x} in winter?", "How cold does {x} get in the winter months?"),
        tuple(CITIES),
    ),
    T(
        ("How do I read a file line by line in {x}?", "What is the way to iterate over the lines of a file in {x}?"),
        tuple(LANGUAGES),
        "How do I write a file line by line in {x}?",
    ),
    T(
        ("What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}."),
        tuple(COUNTRIES),
    ),
    T(
        ("How do I reset my {x} to factory settings?", "What are the steps to factory reset a {x}?"),
        tuple(PRODUCTS),
        "How do I stop my {x} from resetting to factory settings?",
    ),
    T(("Who was {x}?", "Tell me who {x} was.", "Give me a short biography of {x}."), tuple(PEOPLE)),
    T(
        ("How many {x} minutes are in a day?", "In a day, how many {x} minutes are there?"),
        tuple(NUMBERS),
        None,
        "number",
    ),
    T(
        ("What is {x} times 12?", "Multiply {x} by 12.", "Calculate {x} multiplied by 12."),
        tuple(NUMBERS),
        "What is {x} divided by 12?",
        "number",
    ),
    T(("Give me a recipe for {x}.", "How do I cook {x}?", "What's a good way to make {x} at home?"), tuple(FOODS)),
    T(("How often should I feed my {x}?", "How many times a day do {x} need to eat?"), tuple(ANIMALS)),
    T(
        ("How do I create an index in {x}?", "What is the syntax to add an index in {x}?"),
        tuple(DATABASES),
        "How do I drop an index in {x}?",
    ),
    T(
        ("Is it safe to travel to {x} right now?", "Is {x} a safe place to visit at the moment?"),
        tuple(COUNTRIES),
        "Is it unsafe to travel to {x} right now?",
    ),
    T(("What is the best time of year to visit {x}?", "When should I go to {x} for the best weather?"), tuple(CITIES)),
    T(
        ("How do I install {x} on Ubuntu?", "What are the steps to set up {x} on an Ubuntu machine?"),
        tuple(DATABASES),
        "How do I uninstall {x} on Ubuntu?",
    ),
    T(
        ("How do I sort a list in {x}?", "What's the way to sort an array in {x}?"),
        tuple(LANGUAGES),
        "How do I shuffle a list in {x}?",
    ),
    T(
        ("What are the main exports of {x}?", "What does {x} export the most?"),
        tuple(COUNTRIES),
        "What are the main imports of {x}?",
    ),
    T(("Write a haiku about {x}.", "Compose a haiku on the subject of {x}."), tuple(ANIMALS)),
    T(
        ("How long should I boil an egg for {x} minutes?", "Is {x} minutes enough to boil an egg?"),
        tuple(NUMBERS),
        None,
        "number",
    ),
    T(("What is the official language of {x}?", "Which language do people speak officially in {x}?"), tuple(COUNTRIES)),
    T(
        ("How do I handle exceptions in {x}?", "What is the error handling mechanism in {x}?"),
        tuple(LANGUAGES),
        "How do I raise exceptions in {x}?",
    ),
    T(("Convert 100 {x} to {y}.", "What is 100 {x} in {y}?"), tuple(CURRENCIES)),
    T(("How do I convert {x} to {y}?", "What's the formula to go from {x} to {y}?"), tuple(UNITS)),
    T(("What are the symptoms of a cold in {x}?", "How can I tell if my {x} have a cold?"), tuple(ANIMALS)),
    T(
        (
            "Can I take ibuprofen with {x} mg of paracetamol?",
            "Is it OK to combine ibuprofen and {x} mg of paracetamol?",
        ),
        tuple(NUMBERS),
        "Why can't I take ibuprofen with {x} mg of paracetamol?",
        "number",
    ),
    T(("What year did {x} die?", "When did {x} pass away?"), tuple(PEOPLE), "What year was {x} born?"),
    T(
        ("How do I connect to {x} from Python?", "What's the Python code to open a connection to {x}?"),
        tuple(DATABASES),
    ),
    T(("Summarize the history of {x} in a paragraph.", "Give me a one-paragraph history of {x}."), tuple(COUNTRIES)),
    T(("What time zone is {x} in?", "Which time zone does {x} use?"), tuple(CITIES)),
    T(("Explain recursion with an example in {x}.", "Show me how recursion works using {x}."), tuple(LANGUAGES)),
    T(
        ("Is {x} a prime number?", "Tell me whether {x} is prime."),
        tuple(NUMBERS),
        "Is {x} not a prime number?",
        "number",
    ),
    T(
        ("How do I charge my {x} faster?", "What can I do to speed up charging on my {x}?"),
        tuple(PRODUCTS),
        "How do I make my {x} battery last longer?",
    ),
    T(("Can {x} eat chocolate?", "Is chocolate safe for {x}?"), tuple(ANIMALS), "Why can't {x} eat chocolate?"),
    T(
        ("How do I back up a {x} database?", "What is the way to make a backup of a {x} database?"),
        tuple(DATABASES),
        "How do I restore a {x} database?",
    ),
    T(
        ("What is the tallest building in {x}?", "Which building in {x} is the highest?"),
        tuple(CITIES),
        "What is the oldest building in {x}?",
    ),
    T(("How many calories are in {x}?", "What's the calorie count of {x}?"), tuple(FOODS)),
    T(
        ("Translate 'good morning' into the language of {x}.", "How do you say 'good morning' in {x}?"),
        tuple(COUNTRIES),
        "Translate 'good night' into the language of {x}.",
    ),
    T(
        ("Is {x} faster than Python?", "Does {x} run faster than Python?"),
        tuple(LANGUAGES[1:]),
        "Is {x} slower than Python?",
    ),
    T(
        ("What is the current inflation rate in {x}?", "How high is inflation in {x} at the moment?"),
        tuple(COUNTRIES),
        "What is the current unemployment rate in {x}?",
    ),
    T(
        ("I have {x} apples and eat 2. How many are left?", "If I start with {x} apples and eat two, how many remain?"),
        tuple(NUMBERS),
        "I have {x} apples and buy 2 more. How many do I have?",
        "number",
    ),
    T(
        ("Recommend a good book about {x}.", "What's a good book to read about {x}?"),
        tuple(PEOPLE),
        "Recommend a good film about {x}.",
    ),
    T(
        (
            "How do I update my {x} to the latest software?",
            "What are the steps to install the newest update on my {x}?",
        ),
        tuple(PRODUCTS),
        "How do I roll back a software update on my {x}?",
    ),
    T(
        ("Plan a {x} day itinerary for Rome.", "Make me a {x}-day travel plan for Rome."),
        tuple(NUMBERS),
        None,
        "number",
    ),
    T(
        ("Why is my {x} query slow?", "What makes a {x} query run slowly?"),
        tuple(DATABASES),
        "Why is my {x} query fast?",
    ),
    T(("What should I pack for a trip to {x}?", "Give me a packing list for visiting {x}."), tuple(CITIES)),
    T(("Can I freeze {x}?", "Is it OK to put {x} in the freezer?"), tuple(FOODS), "Can I reheat {x}?"),
    T(
        ("What's the fastest way to learn {x}?", "How can I learn {x} quickly?"),
        tuple(LANGUAGES),
        "What's the slowest way to learn {x}?",
    ),
)


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    same: bool  # the same question: serving one's answer for the other is right
    kind: str  # paraphrase | entity | number | negation | order
    half: str  # pick | check


def _fill(form: str, x: str, y: str | None = None) -> str:
    return form.replace("{x}", x).replace("{y}", y or "")


def pairs(seed: int = 21) -> list[Pair]:
    """Every pair of the set, in a fixed order (the same for a given seed)."""
    rng = random.Random(seed)
    out: list[Pair] = []
    for t_index, t in enumerate(TEMPLATES):
        half = "pick" if t_index % 2 == 0 else "check"
        two_slots = any("{y}" in f for f in t.forms)
        if two_slots:
            slot_pairs = list(itertools.permutations(t.values, 2))
            rng.shuffle(slot_pairs)
            for x, y in slot_pairs[:6]:
                for i, j in itertools.combinations(range(len(t.forms)), 2):
                    out.append(Pair(_fill(t.forms[i], x, y), _fill(t.forms[j], x, y), True, "paraphrase", half))
                out.append(Pair(_fill(t.forms[0], x, y), _fill(t.forms[0], y, x), False, "order", half))
                out.append(Pair(_fill(t.forms[0], x, y), _fill(t.forms[-1], y, x), False, "order", half))
            continue
        for x in t.values:
            for i, j in itertools.combinations(range(len(t.forms)), 2):
                out.append(Pair(_fill(t.forms[i], x), _fill(t.forms[j], x), True, "paraphrase", half))
            others = [v for v in t.values if v != x]
            for y in rng.sample(others, min(2, len(others))):
                i, j = rng.randrange(len(t.forms)), rng.randrange(len(t.forms))
                out.append(Pair(_fill(t.forms[i], x), _fill(t.forms[j], y), False, t.kind, half))
            if t.negated is not None:
                i = rng.randrange(len(t.forms))
                out.append(Pair(_fill(t.forms[i], x), _fill(t.negated, x), False, "negation", half))
    return out


if __name__ == "__main__":
    import collections

    counts = collections.Counter((p.half, p.kind) for p in pairs())
    for (half, kind), n in sorted(counts.items()):
        print(f"{half:6} {kind:11} {n}")
