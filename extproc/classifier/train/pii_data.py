"""Synthetic PII training sentences: Faker values in this project's own chat-style templates.

Half of what a router sees is code, maths and logistics chatter full of numbers that are not PII,
so a large share of the output is PII-free negatives: order IDs, versions, dates, hashes, prices,
ports, code. The evaluation set (presidio_synth_v2) is never used here.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

from faker import Faker

LOCALES = (
    "en_US",
    "en_GB",
    "de_DE",
    "fr_FR",
    "es_ES",
    "it_IT",
    "nl_NL",
    "pl_PL",
    "sv_SE",
    "da_DK",
    "fi_FI",
    "pt_BR",
    "en_AU",
    "en_IN",
    "cs_CZ",
    "no_NO",
    "hu_HU",
    "el_GR",
)
IBAN_LOCALES = (
    "de_DE",
    "fr_FR",
    "es_ES",
    "it_IT",
    "nl_NL",
    "pl_PL",
    "en_GB",
    "fi_FI",
    "da_DK",
    "sv_SE",
    "cs_CZ",
    "no_NO",
    "hu_HU",
    "pt_PT",
)


@dataclass
class Example:
    text: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, type)


# Slots: {PERSON} {FIRST} {LAST} {EMAIL_ADDRESS} {PHONE_NUMBER} {CREDIT_CARD} {US_SSN}
# {IP_ADDRESS} {IBAN_CODE} {STREET_ADDRESS} {FULL_ADDRESS}; unlabelled fillers: {CITY} {COMPANY}
# {DATE} {TIME} {ORDER} {VERSION} {MONEY} {NUM} {YEAR} {PORT} {HASH} {PRODUCT}
POSITIVE = [
    "hey, can you draft an email to {PERSON} ({EMAIL_ADDRESS}) saying the meeting moved to {DATE}?",
    "my name is {PERSON} and my card {CREDIT_CARD} got charged twice for order {ORDER}",
    "please send the invoice to {EMAIL_ADDRESS}, thanks",
    "call me back at {PHONE_NUMBER} whenever you get a chance",
    "Hi {FIRST}, just checking if you got my message from {DATE}?",
    "ship it to {FULL_ADDRESS} please",
    "new shipping address: {STREET_ADDRESS}, {CITY}",
    "I moved! my new address is {FULL_ADDRESS}",
    "my ssn is {US_SSN}, do I need it for the {YEAR} tax form?",
    "SSN: {US_SSN}\nDOB: {DATE}",
    "Name: {PERSON}\nPhone: {PHONE_NUMBER}\nEmail: {EMAIL_ADDRESS}",
    "Name: {PERSON}\nAddress: {FULL_ADDRESS}\nCard: {CREDIT_CARD}",
    "the server at {IP_ADDRESS} keeps timing out on port {PORT}, any idea why?",
    "why can't I ping {IP_ADDRESS} from inside the container",
    "our nginx logs show {NUM} requests from {IP_ADDRESS} in one minute, is that an attack?",
    "wire {MONEY} to IBAN {IBAN_CODE} (account holder {PERSON})",
    "is {IBAN_CODE} a valid iban? my bank app rejects it",
    "Can you write a polite reminder to {PERSON} about the unpaid invoice {ORDER}?",
    "{PERSON} called from {PHONE_NUMBER} asking about the delivery",
    "I lost my credit card {CREDIT_CARD}, how do I block it?",
    "payment failed for card number {CREDIT_CARD} exp {EXPIRY}",
    "Contact {PERSON} at {EMAIL_ADDRESS} or {PHONE_NUMBER}.",
    "translate to french: Dear {PERSON}, thank you for your order {ORDER}.",
    "summarize this: {PERSON} met {PERSON} in {CITY} on {DATE} to discuss the {COMPANY} merger.",
    "{FIRST} said she'd text me at {PHONE_NUMBER} but never did",
    "my landlord {PERSON} wants the deposit sent to {IBAN_CODE}",
    "fix the typo in my signature:\n{PERSON}\n{COMPANY}\n{PHONE_NUMBER}\n{EMAIL_ADDRESS}",
    "is it safe to post my address ({STREET_ADDRESS}) on facebook?",
    "{PERSON}, {FULL_ADDRESS}",
    "Bot: what address should we use?\nUser: {FULL_ADDRESS}",
    "Bot: and your phone number?\nUser: {PHONE_NUMBER}",
    "Bot: may I have your full name?\nUser: {PERSON}",
    "Bot: which email is on the account?\nUser: {EMAIL_ADDRESS}",
    "I'm {PERSON}, a {JOB} from {CITY}. Help me write a cover letter for {COMPANY}.",
    "Write a short bio for {PERSON}, who has worked at {COMPANY} since {YEAR}.",
    "remind me to call {FIRST} {LAST} tomorrow at {TIME}",
    "cc {EMAIL_ADDRESS} and {EMAIL_ADDRESS} on the release notes for {VERSION}",
    "Does {PERSON} still live at {STREET_ADDRESS}?",
    "the patient, {PERSON} (SSN {US_SSN}), was admitted on {DATE}",
    "user {EMAIL_ADDRESS} logged in from {IP_ADDRESS} at {TIME}",
    "firewall: allow {IP_ADDRESS}/32 to reach {IP_ADDRESS} on {PORT}",
    "I want to dispute a charge on {CREDIT_CARD}, the merchant was {COMPANY}",
    "please update my iban to {IBAN_CODE} before the {DATE} payroll",
    "what does it mean if {FIRST} {LAST} keeps calling from {PHONE_NUMBER}?",
    "Mr. {LAST} asked me to forward this to {EMAIL_ADDRESS}",
    "Dr. {PERSON} will see you at {STREET_ADDRESS} on {DATE}",
    "Meet me at {STREET_ADDRESS} at {TIME}, ask for {FIRST}.",
    "can u check if {US_SSN} is formatted right for the w-2",
    "{PERSON} <{EMAIL_ADDRESS}> wrote:\n> can we move the call?",
    "Good morning {FIRST}! Your parcel {ORDER} will be delivered to {FULL_ADDRESS}.",
    "Here's the customer record: {PERSON}, {PHONE_NUMBER}, {STREET_ADDRESS}, card ending {NUM4}",
    "ssh {USER}@{IP_ADDRESS} -p {PORT} fails with permission denied",
    "the DNS resolves to {IP_ADDRESS} but the site shows a {HTTP} error",
    "{TEXT} By the way, my number is {PHONE_NUMBER}.",
    "{TEXT} Please reply to {EMAIL_ADDRESS}.",
    "{TEXT} Card for the subscription: {CREDIT_CARD}.",
    "{TEXT} My SSN is {US_SSN} if you need it.",
    "{TEXT} Send it to {FULL_ADDRESS}.",
    "{TEXT} Thanks, {PERSON}",
    "{TEXT} Transfer to {IBAN_CODE}.",
    "{TEXT} The box is at {IP_ADDRESS}.",
    "My daughter {FIRST} is turning {AGE}, ideas for a party?",
    "I need a letter of recommendation for {PERSON}, she worked with me at {COMPANY}.",
    "Regards,\n{PERSON}\n{PHONE_NUMBER}",
    "Thanks!\n-- \n{PERSON} | {COMPANY} | {PHONE_NUMBER}",
    "{PERSON} and {PERSON} are getting married, write a toast",
    "why did {COMPANY} bill {CREDIT_CARD} after I cancelled?",
]

NEGATIVE = [
    "order {ORDER} still hasn't shipped, it's been {NUM} days since {DATE}",
    "upgrading from {VERSION} to {VERSION} broke the build, any ideas?",
    "what's {NUM} * {NUM}? show your work",
    "convert {MONEY} to euros at a rate of 0.{NUM}",
    "the meeting is on {DATE} at {TIME} in room {NUM}",
    "tracking number {TRACKING}, where is my parcel?",
    "commit {HASH} introduced a regression in {VERSION}",
    "set the timeout to {NUM} ms and retry {NUM2} times",
    "docker run -p {PORT}:{PORT} myimage:{VERSION}",
    "pip install requests=={VERSION}",
    "the invoice total is {MONEY}, due {DATE}, reference {ORDER}",
    "ISBN {ISBN} is the second edition, right?",
    "my flight {FLIGHT} departs at {TIME} on {DATE}",
    "solve for x: {NUM}x + {NUM2} = {NUM}",
    "the population of {CITY} grew from {NUM} to {NUM} between {YEAR} and {YEAR}",
    "our Q{Q} revenue was {MONEY}, up {NUM2}% year over year",
    "error code {HEX} when starting the service, version {VERSION}",
    "listen on 0.0.0.0:{PORT} or 127.0.0.1:{PORT}?",
    "the uuid {UUID} is duplicated in the table",
    "ticket {TICKET} is blocked by {TICKET}",
    "what happened in {CITY} in {YEAR}?",
    "Who founded {COMPANY} and when?",
    "I need {NUM2} units of SKU {SKU} by {DATE}",
    "the sensor reads {NUM}.{NUM2} degrees at {TIME}",
    "how do I format {DATE} as ISO 8601 in python?",
    "my build number is {NUM}{NUM}, release channel {VERSION}",
    "calculate compound interest on {MONEY} at {NUM2}% for {NUM2} years",
    "the part number {SKU} fits models {NUM}-{NUM2} and {NUM}-{NUM2}",
    "room {NUM}, floor {NUM2}, building {LETTER}",
    "{TEXT}",
    "{TEXT}",
    "{TEXT}",
    "{TEXT} See ticket {TICKET}.",
    "{TEXT} (version {VERSION}, build {NUM})",
    "{CODE}",
    "{CODE}",
    "{CODE}",
    "why does this fail?\n{CODE}",
    "explain this code:\n{CODE}",
    "refactor this please:\n{CODE}\nit should handle {NUM} items",
    "Table: id | amount | date\n{ROWS}",
    "the matrix [[{NUM}, {NUM2}], [{NUM2}, {NUM}]] has determinant?",
    "phone model {PRODUCT} {NUM2} vs {PRODUCT} {NUM2}, which is better?",
    "what is the capital of {COUNTRY}?",
    "write a haiku about {WORD} and {WORD}",
    "In {YEAR}, the {COMPANY} factory produced {NUM} cars.",
    "The function returns {NUM} for input {NUM2}; expected {NUM}.",
    "subnet mask 255.255.255.0 and gateway, how many hosts in a /{NUM2}?",
    "is 4111 1111 1111 1112 a test card number? it fails checks",
    "account number {NUM}{NUM} in our ledger, invoice {ORDER}",
]

WORDS = ("river", "autumn", "code", "coffee", "rain", "mountain", "silence", "lamp", "tide")
PRODUCTS = ("Pixel", "Galaxy", "iPhone", "ThinkPad", "Kindle", "Switch")
FILLER = [
    "I'm working on a project and need some help.",
    "Quick question about my account.",
    "Following up on yesterday's conversation.",
    "Here are the details you asked for.",
    "We're planning the offsite for next quarter and the budget is tight.",
    "The report covers sales for {YEAR} across {NUM2} regions.",
    "Can you help me rewrite this paragraph so it sounds more professional?",
    "The test suite has {NUM} cases and {NUM2} of them are flaky.",
    "Our team migrated the database last week and latency went up by {NUM2}%.",
    "I read that the {WORD} index rose {NUM2} points in {YEAR}.",
    "Explain the difference between a mutex and a semaphore.",
    "What are the main causes of inflation?",
    "Photosynthesis converts light energy into chemical energy.",
    "The Treaty of Westphalia was signed in 1648.",
    "A ball is thrown upward at {NUM2} m/s; how high does it go?",
]


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers = {}
        for i, loc in enumerate(sorted(set(LOCALES + IBAN_LOCALES))):
            f = Faker(loc)
            f.seed_instance(seed * 1000 + i)
            self.fakers[loc] = f
        self.en = self.fakers["en_US"]

    def fk(self, pool: tuple[str, ...] = LOCALES) -> Faker:
        return self.fakers[self.rng.choice(pool)]

    # ---- PII values -------------------------------------------------------------------------
    def person(self) -> str:
        f, r = self.fk(), self.rng.random()
        if r < 0.55:
            return f"{f.first_name()} {f.last_name()}"
        if r < 0.7:
            return f"{f.first_name()} {self.rng.choice(string.ascii_uppercase)}. {f.last_name()}"
        if r < 0.8:
            return f"{f.first_name()} {f.first_name()} {f.last_name()}"
        if r < 0.9:
            return f.last_name()
        return f.first_name()

    def email(self) -> str:
        f, r = self.fk(), self.rng.random()
        first, last = (re.sub(r"[^A-Za-z]", "", x) or "x" for x in (f.first_name(), f.last_name()))
        dom = self.rng.choice([f.free_email_domain(), f.domain_name(), self.en.domain_name()])
        if r < 0.3:
            return f.email()
        if r < 0.55:
            return f"{first}{last}@{dom}"
        if r < 0.75:
            return f"{first.lower()}.{last.lower()}@{dom}"
        if r < 0.9:
            return f"{first[0].lower()}{last.lower()}{self.rng.randint(1, 99)}@{dom}"
        return f"{first}{self.rng.choice(string.ascii_uppercase)}{last}@{dom}"

    def phone(self) -> str:
        r = self.rng.random()
        d = lambda n: "".join(self.rng.choice(string.digits) for _ in range(n))  # noqa: E731
        if r < 0.5:
            return self.fk().phone_number()
        patterns = [
            lambda: f"{d(3)}-{d(3)}-{d(4)}",
            lambda: f"({d(3)}) {d(3)}-{d(4)}",
            lambda: f"+{self.rng.randint(1, 99)} {d(3)} {d(3)} {d(4)}",
            lambda: f"+{self.rng.randint(1, 99)} (0){d(2)} {d(3)} {d(2)} {d(2)}",
            lambda: f"0{d(3)} {d(2)} {d(2)} {d(2)}",
            lambda: f"{d(2)} {d(3)} {d(3)}",
            lambda: f"{d(2)}.{d(2)}.{d(2)}.{d(2)}.{d(2)}",
            lambda: f"0{d(4)} {d(6)}",
            lambda: f"+1-{d(3)}-{d(3)}-{d(4)}",
            lambda: f"({d(2)}) {d(3)}-{d(3)}",
            lambda: f"{d(3)} {d(4)}",
            lambda: d(10),
            lambda: f"{d(4)} {d(4)}",
        ]
        return self.rng.choice(patterns)()

    def credit_card(self) -> str:
        num = re.sub(r"\D", "", self.en.credit_card_number())
        r = self.rng.random()
        if r < 0.5:
            return num
        sep = self.rng.choice([" ", "-"])
        if len(num) == 15:
            return sep.join([num[:4], num[4:10], num[10:]])
        return sep.join(num[i : i + 4] for i in range(0, len(num), 4))

    def ssn(self) -> str:
        s = self.en.ssn()
        r = self.rng.random()
        return s if r < 0.75 else s.replace("-", " ") if r < 0.88 else s.replace("-", "")

    def ip(self) -> str:
        return self.en.ipv4() if self.rng.random() < 0.85 else self.en.ipv6()

    def iban(self) -> str:
        v = self.fk(IBAN_LOCALES).iban()
        if self.rng.random() < 0.35:
            v = " ".join(v[i : i + 4] for i in range(0, len(v), 4))
        return v

    def street(self) -> str:
        f = self.fk()
        s = f.street_address()
        if self.rng.random() < 0.2 and hasattr(f, "secondary_address"):
            s += self.rng.choice([" ", ", "]) + f.secondary_address()
        return s

    def full_address(self) -> str:
        f = self.fk()
        a = f.address()
        r = self.rng.random()
        if r < 0.35:
            a = a.replace("\n", ", ")
        elif r < 0.5:
            a = a + "\n" + f.current_country() if hasattr(f, "current_country") else a
        elif r < 0.6:
            a = f"{self.street()}\n{f.city()} {f.postcode()}"
        return a

    # ---- fillers (not PII) ------------------------------------------------------------------
    def filler(self, slot: str) -> str:
        rng, f = self.rng, self.fk()
        num = lambda a, b: str(rng.randint(a, b))  # noqa: E731
        table = {
            "CITY": f.city,
            "COMPANY": f.company,
            "JOB": self.en.job,
            "COUNTRY": self.en.country,
            "DATE": lambda: rng.choice(
                [f.date(), self.en.date(pattern="%B %d, %Y"), self.en.date(pattern="%d/%m/%Y"), self.en.day_of_week()]
            ),
            "TIME": lambda: self.en.time(pattern=rng.choice(["%H:%M", "%I:%M %p", "%H:%M:%S"])),
            "ORDER": lambda: rng.choice(["#", "ORD-", "PO-", "INV-", "", "A"]) + num(10000, 99999999),
            "VERSION": lambda: (
                rng.choice(["v", "", ""]) + ".".join(num(0, 30) for _ in range(rng.choice([2, 3, 3, 4])))
            ),
            "MONEY": lambda: rng.choice(["$", "€", "£", ""]) + f"{rng.uniform(1, 99999):,.2f}",
            "NUM": lambda: num(0, 99999),
            "NUM2": lambda: num(1, 99),
            "NUM4": lambda: num(1000, 9999),
            "YEAR": lambda: num(1700, 2030),
            "PORT": lambda: num(80, 65535),
            "AGE": lambda: num(2, 90),
            "HASH": lambda: self.en.sha1()[: rng.choice([7, 12, 40])],
            "HEX": lambda: hex(rng.getrandbits(32)),
            "UUID": lambda: str(self.en.uuid4()),
            "TRACKING": lambda: rng.choice(["1Z", "JD", "LX", ""]) + num(10**9, 10**12) + rng.choice(["", "GB", "US"]),
            "ISBN": lambda: self.en.isbn13(),
            "FLIGHT": lambda: rng.choice(["LH", "BA", "UA", "AF"]) + num(10, 9999),
            "TICKET": lambda: rng.choice(["JIRA-", "OPS-", "#", "BUG-"]) + num(1, 99999),
            "SKU": lambda: (
                f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}-{num(100, 99999)}"
            ),
            "Q": lambda: num(1, 4),
            "LETTER": lambda: rng.choice(string.ascii_uppercase),
            "WORD": lambda: rng.choice(WORDS),
            "PRODUCT": lambda: rng.choice(PRODUCTS),
            "USER": lambda: rng.choice(["root", "ubuntu", "admin", "deploy", "ec2-user"]),
            "HTTP": lambda: rng.choice(["404", "502", "503", "500", "403"]),
            "EXPIRY": lambda: f"{rng.randint(1, 12):02d}/{rng.randint(24, 33)}",
            "CODE": self.code,
            "ROWS": self.rows,
            "TEXT": lambda: self._fill(rng.choice(FILLER), [])[0],
        }
        return table[slot]()

    def code(self) -> str:
        rng = self.rng
        n = lambda: str(rng.randint(0, 9999))  # noqa: E731
        snippets = [
            f"def area(r):\n    return 3.14159 * r ** 2\n\nprint(area({n()}))",
            f"for i in range({n()}):\n    if i % {rng.randint(2, 9)} == 0:\n        total += i",
            f"SELECT id, amount FROM orders WHERE created_at > "
            f"'2023-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}' LIMIT {n()};",
            f"const port = process.env.PORT || {rng.randint(1000, 9999)};\napp.listen(port);",
            f"git checkout -b fix/{n()} && git commit -m "
            f"'bump to {rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}'",
            f"curl -X POST http://localhost:{rng.randint(1000, 9999)}/api/v1/items -d '{{\"qty\": {n()}}}'",
            f"x = np.zeros(({rng.randint(1, 512)}, {rng.randint(1, 512)}))\ny = x @ w + b",
            f"kubectl scale deployment web --replicas={rng.randint(1, 20)}",
            f"int main() {{ int a[{rng.randint(2, 100)}]; return a[0] * {n()}; }}",
            f"version: '3.{rng.randint(0, 9)}'\nservices:\n  db:\n    image: postgres:{rng.randint(9, 17)}"
            f'\n    ports:\n      - "{rng.randint(1000, 9999)}:5432"',
            f"assert parse('{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)}') == "
            f"date({rng.randint(1990, 2030)}, {rng.randint(1, 12)}, {rng.randint(1, 28)})",
            f"ERROR 2024-0{rng.randint(1, 9)}-{rng.randint(10, 28)}T{rng.randint(10, 23)}:"
            f"{rng.randint(10, 59)}:00Z worker-{rng.randint(1, 9)} exited with code {rng.randint(1, 255)}",
            f"hash = {self.en.sha256()[:32]!r}\nsize = {n()}  # bytes",
        ]
        return rng.choice(snippets)

    def rows(self) -> str:
        return "\n".join(
            f"{self.rng.randint(1, 9999)} | {self.rng.uniform(1, 9999):.2f} | {self.en.date()}"
            for _ in range(self.rng.randint(2, 5))
        )

    def _value(self, slot: str) -> tuple[str, str | None]:
        pii = {
            "PERSON": (self.person, "PERSON"),
            "FIRST": (lambda: self.fk().first_name(), "PERSON"),
            "LAST": (lambda: self.fk().last_name(), "PERSON"),
            "EMAIL_ADDRESS": (self.email, "EMAIL_ADDRESS"),
            "PHONE_NUMBER": (self.phone, "PHONE_NUMBER"),
            "CREDIT_CARD": (self.credit_card, "CREDIT_CARD"),
            "US_SSN": (self.ssn, "US_SSN"),
            "IP_ADDRESS": (self.ip, "IP_ADDRESS"),
            "IBAN_CODE": (self.iban, "IBAN_CODE"),
            "STREET_ADDRESS": (self.street, "STREET_ADDRESS"),
            "FULL_ADDRESS": (self.full_address, "STREET_ADDRESS"),
        }
        if slot in pii:
            fn, typ = pii[slot]
            return fn(), typ
        return self.filler(slot), None

    def _fill(self, template: str, spans: list[tuple[int, int, str]]) -> tuple[str, list]:
        out, pos = [], 0
        for m in re.finditer(r"\{([A-Z_0-9]+)\}", template):
            out.append(template[pos : m.start()])
            value, typ = self._value(m.group(1))
            start = sum(len(x) for x in out)
            out.append(value)
            if typ:
                spans.append((start, start + len(value), typ))
            pos = m.end()
        out.append(template[pos:])
        return "".join(out), spans

    def one(self, negative: bool) -> Example:
        template = self.rng.choice(NEGATIVE if negative else POSITIVE)
        text, spans = self._fill(template, [])
        if self.rng.random() < 0.15:  # chat prompts are often all lower case
            text = text.lower()
        return Example(text, spans)

    def sample(self, negative_share: float = 0.45, long_share: float = 0.12) -> Example:
        """One training text; a few are several messages joined, so windows see long inputs."""
        if self.rng.random() >= long_share:
            return self.one(self.rng.random() < negative_share)
        parts = [self.one(self.rng.random() < 0.7) for _ in range(self.rng.randint(3, 8))]
        text, spans = "", []
        for p in parts:
            sep = self.rng.choice(["\n\n", "\n", " "]) if text else ""
            off = len(text) + len(sep)
            text += sep + p.text
            spans += [(a + off, b + off, t) for a, b, t in p.spans]
        return Example(text, spans)


def generate(n: int, seed: int) -> list[Example]:
    g = Generator(seed)
    return [g.sample() for _ in range(n)]
