"""Synthetic PII training sentences: Faker values in this project's own chat-style templates.

Half of what a router sees is code, maths and logistics chatter full of numbers that are not PII,
so a large share of the output is PII-free negatives: order IDs, versions, dates, hashes, prices,
ports, code. A share of the texts are multi-line (option lists, bullet and numbered lists, markdown
tables, code in several languages, logs, reference lists), mostly PII-free and some with a name or an
address on one of their lines: in the one-line templates every short line after a newline is PII
(signatures, address blocks, forms), and a tagger trained on those alone learns "a short line is a
name". The evaluation set (presidio_synth_v2) is never used here, nor is any MMLU text.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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

EPOCH = datetime(1970, 1, 1)
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


# Capitalised phrases that are not PII, for option lists, headings and titles (this project's own).
CONCEPTS = (
    "Opportunity cost",
    "Marginal utility",
    "Comparative advantage",
    "Price elasticity",
    "Fiscal policy",
    "Monetary base",
    "Aggregate demand",
    "Sunk cost fallacy",
    "Moral hazard",
    "Adverse selection",
    "Natural selection",
    "Genetic drift",
    "Gene flow",
    "Cell membrane",
    "Ribosome",
    "Golgi apparatus",
    "Mitochondrial matrix",
    "Covalent bond",
    "Ionic bond",
    "Hydrogen bonding",
    "Dipole forces",
    "Oxidation state",
    "Ideal gas law",
    "Kinetic energy",
    "Potential energy",
    "Angular momentum",
    "Centripetal force",
    "Doppler effect",
    "Total internal reflection",
    "Carnot cycle",
    "Heat exchanger",
    "Ground loop",
    "Phase margin",
    "Eddy currents",
    "Heat sink",
    "Binary search tree",
    "Hash table",
    "Linked list",
    "Dynamic programming",
    "Depth-first search",
    "Round-robin scheduling",
    "Virtual memory",
    "Page fault",
    "Mutual exclusion",
    "Deadlock",
    "Operant conditioning",
    "Classical conditioning",
    "Cognitive dissonance",
    "Working memory",
    "Confirmation bias",
    "Social loafing",
    "Learned helplessness",
    "Object permanence",
    "Categorical imperative",
    "Social contract",
    "Utilitarianism",
    "Virtue ethics",
    "Moral realism",
    "Due process",
    "Equal protection",
    "Hearsay",
    "Strict liability",
    "Adverse possession",
    "Consideration",
    "Promissory estoppel",
    "Commerce Clause",
    "Habeas corpus",
    "Double jeopardy",
    "The Industrial Revolution",
    "The Cold War",
    "The Reformation",
    "The Silk Road",
    "The Enlightenment",
    "The Treaty of Versailles",
    "The Marshall Plan",
    "The New Deal",
    "The Magna Carta",
    "The Renaissance",
    "Keynesian economics",
    "Darwinian fitness",
    "Freudian slip",
    "Newtonian mechanics",
    "Socratic method",
    "Pavlovian response",
    "Euclidean geometry",
    "Boolean algebra",
    "Cartesian coordinates",
    "Type I error",
    "Type II error",
    "Standard deviation",
    "Null hypothesis",
    "Central limit theorem",
    "Both A and B",
    "Neither A nor B",
    "All of the above",
    "None of the above",
    "I and II only",
    "II and III only",
    "I, II and III",
    "True, True",
    "False, False",
    "True, False",
    "False, True",
    "Increase",
    "Decrease",
    "Remain unchanged",
    "Cannot be determined",
    "It depends on the temperature",
    "Hypertension",
    "Anemia",
    "Insulin resistance",
    "Vitamin D deficiency",
    "Placebo effect",
    "Chapter 11 bankruptcy",
    "Article 5 of the treaty",
    "Section 230",
    "Apollo 11",
    "Boeing 747",
    "Windows 11",
    "Python 3",
    "Route 66",
    "Highway 1 traffic",
    "Room 101",
    "Platform 9",
    "Gate 12",
)
HEADINGS = (
    "Summary",
    "Next steps",
    "Action items",
    "Agenda",
    "Pros",
    "Cons",
    "Requirements",
    "Open questions",
    "Release notes",
    "Known issues",
    "Changelog",
    "Ingredients",
    "Steps",
    "Findings",
    "Risks",
    "Goals",
)
UNITS = ("m/s", "kg", "J", "N", "kPa", "mol", "K", "°C", "Hz", "mA", "V", "W", "cm", "km", "L", "%", "eV", "mg/dL")
LIST_MARKERS = ("{L}) ", "{L}. ", "({L}) ", "{l}) ", "{L}: ", "{n}. ", "{n}) ", "- ", "* ", "• ")
PII_LINE = {  # one line of a list that carries PII
    "PERSON": ("{PERSON}", "Call {PERSON} about the {WORD} order", "Owner: {PERSON}", "{PERSON} (on leave)"),
    "STREET_ADDRESS": ("{STREET_ADDRESS}", "Ship to {FULL_ADDRESS}", "Pick up keys at {STREET_ADDRESS}"),
    "EMAIL_ADDRESS": ("Contact: {EMAIL_ADDRESS}", "{PERSON} <{EMAIL_ADDRESS}>"),
    "PHONE_NUMBER": ("Phone {PHONE_NUMBER}", "{PERSON}: {PHONE_NUMBER}"),
}


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class _Doc:
    """A text assembled piece by piece, keeping the PII spans of the pieces filled from templates."""

    def __init__(self, gen: Generator) -> None:
        self.gen, self.parts, self.spans, self.n = gen, [], [], 0

    def add(self, text: str) -> _Doc:
        """Literal text (code, markers): never parsed for slots, so braces are safe."""
        self.parts.append(text)
        self.n += len(text)
        return self

    def fill(self, template: str) -> _Doc:
        text, spans = self.gen._fill(template, [])
        self.spans += [(a + self.n, b + self.n, t) for a, b, t in spans]
        return self.add(text)

    def example(self) -> Example:
        return Example("".join(self.parts), self.spans)


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers = {}
        for i, loc in enumerate(sorted(set(LOCALES + IBAN_LOCALES))):
            f = Faker(loc)
            f.seed_instance(seed * 1000 + i)
            for provider in f.providers:  # it_IT builds its city list from a set: order follows the hash seed
                if isinstance(getattr(provider, "cities", None), list):
                    provider.cities = sorted(provider.cities)
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
            "DATE": lambda: self._moment().strftime(rng.choice(["%Y-%m-%d", "%B %d, %Y", "%d/%m/%Y", "%A"])),
            "TIME": lambda: self._moment().strftime(rng.choice(["%H:%M", "%I:%M %p", "%H:%M:%S"])),
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

    def _moment(self) -> datetime:
        """A date and time from the seeded stream (Faker's dates move with the wall clock)."""
        return EPOCH + timedelta(seconds=self.rng.randrange(60 * 365 * 86400))

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
            f"{self.rng.randint(1, 9999)} | {self.rng.uniform(1, 9999):.2f} | {self._moment():%Y-%m-%d}"
            for _ in range(self.rng.randint(2, 5))
        )

    # ---- multi-line texts -------------------------------------------------------------------
    def multiline(self, negative: bool) -> Example:
        """A list, table, code snippet, log or reference list; a positive has PII on one line."""
        rng = self.rng
        pii = None if negative else rng.choices(list(PII_LINE), weights=(45, 30, 15, 10))[0]
        doc = _Doc(self)
        if rng.random() < 0.3:
            doc.fill(rng.choice(("{TEXT}\n", "Here it is:\n", "{TEXT} See below.\n\n", "Can you check this?\n")))
        kind = rng.choices(("options", "list", "table", "code", "log", "refs"), weights=(30, 20, 10, 25, 8, 7))[0]
        getattr(self, f"_ml_{kind}")(doc, pii)
        if rng.random() < 0.2:
            doc.add(rng.choice(("\n\nThanks!", "\nAny ideas?", "\n\nWhich one is right?", "\n")))
        return doc.example()

    def _ident(self, camel: bool = True) -> str:
        words = [re.sub(r"[^a-z]", "", self.en.word()) or "item" for _ in range(self.rng.randint(1, 3))]
        return "".join(w.capitalize() for w in words) if camel else "_".join(words)

    def _title(self) -> str:
        return self.rng.choice(
            (
                lambda: self.en.catch_phrase().title(),
                lambda: f"{self.rng.choice(CONCEPTS)} in {self.fk().city()}, {self.filler('YEAR')}",
                lambda: f"A Note on {self.rng.choice(CONCEPTS)}",
                lambda: self.en.sentence(nb_words=self.rng.randint(3, 7)).rstrip(".").title(),
            )
        )()

    def _option(self, kind: str) -> str:
        rng, f = self.rng, self.fk()
        if kind == "mixed":
            kind = rng.choice(("concept", "number", "place", "phrase", "job", "words"))
        if kind == "concept":
            return rng.choice(CONCEPTS)
        if kind == "number":
            v = rng.choice((str(rng.randint(1, 999)), f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}"))
            v = rng.choice(
                (v, f"{v} \u00d7 10^{rng.randint(-9, 9)}", f"${rng.randint(1, 99999):,}", f"{v}/{rng.randint(2, 9)}")
            )
            return v + rng.choice(("", " ")) + rng.choice(UNITS) if rng.random() < 0.6 else v
        if kind == "place":
            return rng.choice((f.city, f.country, self.en.state, lambda: f"{f.city()} and {f.city()}"))()
        if kind == "phrase":
            return rng.choice((self.en.catch_phrase, lambda: self.en.bs().capitalize()))()
        if kind == "job":
            return self.en.job()
        return " ".join(w.capitalize() if rng.random() < 0.6 else w for w in self.en.words(rng.randint(1, 4)))

    def _marker(self, style: str, i: int) -> str:
        letter = string.ascii_uppercase[i]
        return style.replace("{L}", letter).replace("{l}", letter.lower()).replace("{n}", str(i + 1))

    def _lines(self, doc: _Doc, items: list[str], pii: str | None, style: str) -> None:
        """Literal items, one per line with a marker; with `pii`, one item becomes a PII line."""
        at = self.rng.randrange(len(items)) if pii else -1
        for i, item in enumerate(items):
            doc.add(("\n" if i else "") + self._marker(style, i))
            if i == at:
                doc.fill(self.rng.choice(PII_LINE[pii]))  # type: ignore[index]
            else:
                doc.add(item)

    def _ml_options(self, doc: _Doc, pii: str | None) -> None:
        rng = self.rng
        c = rng.choice(CONCEPTS).lower()
        stem = rng.choice(
            (
                f"Which of the following best describes {c}?",
                f"Question {rng.randint(1, 60)}: Which statement about {c} is correct?",
                f"Which of these is an example of {c}?",
                f"A {rng.choice(WORDS)} of mass {rng.randint(1, 90)} kg moves at {rng.randint(1, 60)} m/s. "
                "What is its kinetic energy?",
                f"Solve for x: {rng.randint(2, 19)}x + {rng.randint(1, 99)} = {rng.randint(100, 999)}",
                f"Where was the {self._title()} first published?",
                "Choose the best answer.",
                f"What is the most likely outcome of a rise in {c}?",
            )
        )
        doc.add(stem + rng.choice(("\n", "\n", "\nOptions:\n", "\n\n")))
        kind = rng.choice(("concept", "number", "place", "phrase", "job", "words", "mixed", "mixed"))
        n = rng.randint(4, 10)
        style = rng.choice(LIST_MARKERS[:7]) if rng.random() < 0.85 else rng.choice(LIST_MARKERS)
        if pii == "PERSON" and rng.random() < 0.4:  # "who" questions: every option is a name
            for i in range(n):
                doc.add(("\n" if i else "") + self._marker(style, i))
                doc.fill(rng.choice(("{PERSON}", "{FIRST} {LAST}", "{LAST}")))
        else:
            self._lines(doc, [self._option(kind) for _ in range(n)], pii, style)
        if rng.random() < 0.3:
            doc.add(rng.choice(("\nAnswer:", f"\nAnswer: {string.ascii_uppercase[rng.randrange(n)]}", "\nA:")))

    def _ml_list(self, doc: _Doc, pii: str | None) -> None:
        rng = self.rng
        if rng.random() < 0.6:
            doc.add(rng.choice(("", "## ", "**")) + rng.choice(HEADINGS) + rng.choice((":", "", "**")) + "\n")
        makers = (
            lambda: rng.choice(CONCEPTS),
            lambda: self.en.bs().capitalize(),
            lambda: self.en.catch_phrase(),
            lambda: f"Update {self._ident(False)} to {self.filler('VERSION')}",
            lambda: f"Fix {self.filler('TICKET')} ({self._ident()})",
            lambda: f"{rng.randint(1, 500)} {rng.choice(UNITS)} of {rng.choice(WORDS)}",
            lambda: f"Review the {self.en.word()} report by {self.filler('DATE')}",
            lambda: f"Move the {self.fk().city()} office to {self.fk().city()}",
            lambda: f"{self._ident()}: {self.filler('NUM2')}% done",
            lambda: self._fill(rng.choice(FILLER), [])[0],
        )
        items = [rng.choice(makers)() for _ in range(rng.randint(3, 6))]
        self._lines(doc, items, pii, rng.choice(LIST_MARKERS[5:]))

    def _ml_table(self, doc: _Doc, pii: str | None) -> None:
        rng = self.rng
        n = rng.randint(2, 4)
        if pii:
            third = {"EMAIL_ADDRESS": "Email", "PHONE_NUMBER": "Phone", "STREET_ADDRESS": "Address"}.get(pii, "City")
            cols = {"Email": "{EMAIL_ADDRESS}", "Phone": "{PHONE_NUMBER}", "Address": "{STREET_ADDRESS}"}
            doc.add(f"| Name | Role | {third} |\n|---|---|---|")
            for _ in range(n):
                doc.add("\n| ").fill("{PERSON}").add(f" | {self.en.job()} | ").fill(cols.get(third, "{CITY}")).add(" |")
            return
        header, row = rng.choice(
            (
                (
                    ("Item", "Qty", "Price"),
                    lambda: (self._option("words"), str(rng.randint(1, 99)), self.filler("MONEY")),
                ),
                (("Service", "Port", "Version"), lambda: (self._ident(), self.filler("PORT"), self.filler("VERSION"))),
                (("City", "Country", "Population"), lambda: (self.fk().city(), self.en.country(), self.filler("NUM"))),
                (("Metric", "Q1", "Q2"), lambda: (self._option("concept"), self.filler("NUM2"), self.filler("NUM2"))),
                (
                    ("Step", "Owner team", "Status"),
                    lambda: (self._option("phrase"), self._ident(), rng.choice(("done", "blocked", "In progress"))),
                ),
                (("Order", "Date", "Total"), lambda: (self.filler("ORDER"), self.filler("DATE"), self.filler("MONEY"))),
            )
        )
        doc.add("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for _ in range(n):
            doc.add("\n| " + " | ".join(row()) + " |")

    def _ml_code(self, doc: _Doc, pii: str | None) -> None:
        rng = self.rng
        cls, fn, var, mod = self._ident(), self._ident(False), self._ident(False), self._ident(False)
        ver, sha, path = (
            self.filler("VERSION"),
            self.en.sha1()[: rng.choice((7, 12, 40))],
            self.en.file_path(depth=rng.randint(1, 4)),
        )
        order, n = self.filler("ORDER"), rng.randint(1, 9999)
        snippets = (
            f"import {mod}\nfrom {mod}.{var} import {cls}, {self._ident()}\n\n\nclass {cls}({self._ident()}):\n"
            f'    """Return the {var} for a {self._ident()}."""\n\n    def {fn}(self, {var}: int = {n}) -> str:\n'
            f"        return self.{var}[{var}]",
            f"const {{ {cls} }} = require('{mod}');\nimport {self._ident()} from './{var}';\n\n"
            f"export function {cls[0].lower() + cls[1:]}({var}) {{\n"
            f"  return fetch(`/api/v{rng.randint(1, 3)}/orders/{order}`).then((r) => r.json());\n}}",
            f'package {mod}\n\nimport (\n\t"fmt"\n\t"github.com/{self.en.user_name()}/{mod}/{var}"\n)\n\n'
            f"func {cls}({var} int) error {{\n"
            f'\treturn fmt.Errorf("{var} %d not found", {var})\n}}',
            f'public class {cls} extends {self._ident()} {{\n    private static final String VERSION = "{ver}";\n\n'
            f"    public {self._ident()} {fn}(List<{self._ident()}> items) {{\n"
            f"        return items.get({n % 10});\n    }}\n}}",
            f"use std::collections::HashMap;\nuse {mod}::{cls};\n\nfn {fn}({var}: &{cls}) -> Option<u32> {{\n"
            f'    let mut m: HashMap<String, u32> = HashMap::new();\n    m.get("{var}").copied()\n}}',
            f'#include <stdio.h>\n#include "{var}.h"\n\nstatic int {fn}(const char *path) {{\n'
            f'    FILE *f = fopen("{path}", "r");\n    return f ? {n} : -1;\n}}',
            f"#!/bin/sh\nset -eu\ncd {path.rsplit('/', 1)[0] or '/srv'}\ngit checkout {sha}\n"
            f"pip install {mod}=={ver}\npython -m {mod}.{var} --order {order}",
            f"name: {mod}\nversion: {ver}\ndependencies:\n  - {self._ident(False)}>={self.filler('VERSION')}\n"
            f"  - {cls}\nenv:\n  {var.upper()}_PATH: {path}\n  COMMIT: {sha}",
            f"SELECT o.id, o.total, c.{var}\nFROM orders o\nJOIN {mod} c ON c.id = o.{var}_id\n"
            f"WHERE o.ref = '{order}'\nORDER BY o.created_at DESC\nLIMIT {n};",
            f'{{\n  "name": "{mod}",\n  "version": "{ver}",\n  "main": "{path}",\n  "dependencies": {{\n'
            f'    "{self._ident(False)}": "^{self.filler("VERSION")}"\n  }}\n}}',
            f"FROM python:3.{rng.randint(8, 13)}-slim\nWORKDIR /app\nCOPY {path} ./\nRUN pip install {mod}=={ver}\n"
            f'CMD ["python", "-m", "{mod}"]',
            f"def {fn}({var}):\n    # {self._option('phrase')}\n    if not {var}:\n"
            f"        raise {cls}Error('{self._option('words')}')\n"
            f"    return {cls}.from_{var}({var}, checksum='{sha}')",
        )
        code = rng.choice(snippets)
        if rng.random() < 0.3:
            code = f"```{rng.choice(('', 'python', 'js', 'go', 'text'))}\n{code}\n```"
        if not pii:
            doc.add(code)
            return
        lines = code.split("\n")
        at = rng.randint(0, len(lines))
        doc.add("\n".join(lines[:at]) + ("\n" if at else ""))
        doc.fill(
            rng.choice(
                {
                    "PERSON": (
                        "# Author: {PERSON}",
                        '__maintainer__ = "{PERSON}"',
                        'owner = "{PERSON}"  # reviewer',
                        'git config user.name "{PERSON}"',
                        "// TODO({FIRST} {LAST}): remove after {VERSION}",
                    ),
                    "STREET_ADDRESS": (
                        'ship_to = "{FULL_ADDRESS}"',
                        '  "address": "{STREET_ADDRESS}",',
                        "-- billing: {STREET_ADDRESS}",
                    ),
                    "EMAIL_ADDRESS": ("# Contact: {PERSON} <{EMAIL_ADDRESS}>", 'notify = "{EMAIL_ADDRESS}"'),
                    "PHONE_NUMBER": ('SUPPORT_PHONE = "{PHONE_NUMBER}"', "// on-call: {PERSON} {PHONE_NUMBER}"),
                }[pii]
            )
        )
        doc.add(("\n" if at < len(lines) else "") + "\n".join(lines[at:]))

    def _ml_log(self, doc: _Doc, pii: str | None) -> None:
        rng = self.rng
        n = rng.randint(2, 4)
        at = rng.randrange(n) if pii else -1
        for i in range(n):
            ts = f"{self._moment():%Y-%m-%dT%H:%M:%S}Z"
            lvl = rng.choice(("INFO", "WARN", "ERROR", "DEBUG"))
            doc.add(("\n" if i else "") + f"{ts} {lvl:<5} [{self._ident()}] ")
            if i == at:
                doc.fill(
                    rng.choice(
                        {
                            "PERSON": ("approved by {PERSON}", "ticket assigned to {FIRST} {LAST}"),
                            "STREET_ADDRESS": ("geocode ok for '{STREET_ADDRESS}'",),
                            "EMAIL_ADDRESS": ("login ok user={EMAIL_ADDRESS} from {IP_ADDRESS}",),
                            "PHONE_NUMBER": ("sms sent to {PHONE_NUMBER}",),
                        }[pii]  # type: ignore[index]
                    )
                )
            else:
                doc.add(
                    rng.choice(
                        (
                            f"job {self.filler('ORDER')} finished in {rng.randint(1, 9999)} ms",
                            f"loaded {self.en.file_path()} ({rng.randint(1, 999)} KB, sha {self.en.sha1()[:12]})",
                            f"{self._ident()} {self.filler('VERSION')} listening on :{self.filler('PORT')}",
                            f"retry {rng.randint(1, 5)}/5: {self._ident()}Exception: {self._option('phrase')}",
                            f"GET /api/{self._ident(False)}/{rng.randint(1, 99999)} {self.filler('HTTP')}",
                        )
                    )
                )

    def _ml_refs(self, doc: _Doc, pii: str | None) -> None:
        rng = self.rng
        n = rng.randint(2, 4)
        at = rng.randrange(n) if pii == "PERSON" else -1
        if rng.random() < 0.5:
            doc.add(rng.choice(("References\n", "Further reading:\n", "Sources:\n")))
        for i in range(n):
            doc.add(("\n" if i else "") + rng.choice(("", f"[{i + 1}] ", f"{i + 1}. ")))
            if i == at:
                doc.fill(rng.choice(("{AUTHOR} ", "{FIRST} {LAST}, ", "{PERSON} and {PERSON}. ")))
            elif pii and pii != "PERSON" and i == n - 1:
                doc.fill(
                    {
                        "EMAIL_ADDRESS": "Correspondence: {EMAIL_ADDRESS}. ",
                        "PHONE_NUMBER": "Orders: {PHONE_NUMBER}. ",
                    }.get(pii, "Publisher office: {FULL_ADDRESS}. ")
                )
            doc.add(
                f"{self._title()}. "
                + rng.choice(
                    (
                        f"Journal of {self._option('concept')}, {self.filler('YEAR')}, "
                        f"{rng.randint(1, 90)}({rng.randint(1, 12)}): {rng.randint(1, 400)}-{rng.randint(401, 900)}.",
                        f"{self.fk().city()}: {rng.choice(CONCEPTS)} Press, {self.filler('YEAR')}.",
                        f"ISBN {self.filler('ISBN')}.",
                        f"doi:10.{rng.randint(1000, 9999)}/{self.en.sha1()[:8]}",
                    )
                )
            )

    def _value(self, slot: str) -> tuple[str, str | None]:
        pii = {
            "PERSON": (self.person, "PERSON"),
            "FIRST": (lambda: self.fk().first_name(), "PERSON"),
            "LAST": (lambda: self.fk().last_name(), "PERSON"),
            "AUTHOR": (lambda: f"{self.fk().last_name()}, {self.rng.choice(string.ascii_uppercase)}.", "PERSON"),
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

    def sample(self, negative_share: float = 0.45, long_share: float = 0.12, multiline_share: float = 0.2) -> Example:
        """One training text; a few are several messages joined, so windows see long inputs.

        A `multiline_share` are lists, tables, code or logs, 60% of them PII-free.
        """
        r = self.rng.random()
        if r >= long_share + multiline_share:
            return self.one(self.rng.random() < negative_share)
        if r >= long_share:
            return self.multiline(self.rng.random() < 0.6)
        parts = [
            self.multiline(self.rng.random() < 0.7) if self.rng.random() < 0.1 else self.one(self.rng.random() < 0.7)
            for _ in range(self.rng.randint(3, 8))
        ]
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
