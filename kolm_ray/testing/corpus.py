"""Seeded synthetic task corpora: article TL;DRs (text), inbound routing (label), lead
extraction (JSON). Deterministic for a seed; built offline for tests, benchmarks and examples.

The tiny base's tokenizer is trained on text made with these generators (seed 101), shipped as
package data (``kolm_ray/train/tiny_tokenizer_corpus.txt.gz``): production code never imports
this module. A change here that changes that text fails ``tests/unit/train/test_base.py``;
regenerate the file only if the tiny base's tokenizer is meant to change.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

TLDR_TASK = "Draft a 60-word TLDR for the article body provided."
ROUTING_TASK = "Route the inbound customer message to the team that should handle it."
LEADS_TASK = "Extract the lead from the cold-email reply as JSON with intent, company and summary."

_TOPICS = {
    "energy": ("grid operator", ["battery", "storage", "turbine", "megawatt", "substation", "solar", "transmission", "outage", "capacity", "utility"]),
    "health": ("hospital network", ["clinic", "patients", "vaccine", "trial", "nurses", "diagnosis", "insurance", "pharmacy", "surgery", "screening"]),
    "finance": ("regional bank", ["deposits", "lending", "mortgage", "interest", "regulator", "capital", "bonds", "earnings", "dividend", "liquidity"]),
    "transit": ("city council", ["buses", "railway", "commuters", "tram", "fares", "station", "timetable", "ridership", "tunnel", "depot"]),
    "farming": ("growers cooperative", ["harvest", "wheat", "irrigation", "drought", "fertilizer", "orchards", "cattle", "soil", "tractor", "silos"]),
    "software": ("startup", ["platform", "developers", "cloud", "release", "security", "database", "customers", "subscription", "outage", "encryption"]),
    "schools": ("school district", ["teachers", "students", "curriculum", "exams", "classrooms", "funding", "tutoring", "attendance", "principal", "literacy"]),
    "shipping": ("port authority", ["containers", "cranes", "freight", "vessels", "harbor", "customs", "warehouse", "tariffs", "dockworkers", "cargo"]),
}
_PLACES = ["Oslo", "Lyon", "Denver", "Osaka", "Quito", "Leeds", "Perth", "Gdansk", "Austin", "Porto"]
_VERBS = ["expanded", "cut", "reviewed", "delayed", "approved", "funded", "rebuilt", "audited", "doubled", "paused"]
_FILLER = [
    "Officials said the decision followed months of debate.",
    "Critics argued the timeline was too ambitious.",
    "Local residents gave the plan a mixed reception.",
    "Analysts expect further changes next year.",
    "The announcement came during a regular briefing.",
]


@dataclass(frozen=True)
class Row:
    id: str
    input: str
    output: str
    topic: str

    def to_json(self, with_output: bool = True) -> str:
        d = {"id": self.id, "input": self.input}
        if with_output:
            d["output"] = self.output
        return json.dumps(d)


def tldr_rows(n: int, seed: int = 0) -> list[Row]:
    """Articles of ~150-250 words with 45-65-word TL;DRs drawn from the same key facts."""
    rng = random.Random(seed)
    rows = []
    topics = sorted(_TOPICS)
    for i in range(n):
        topic = topics[i % len(topics)]
        actor, words = _TOPICS[topic]
        place = rng.choice(_PLACES)
        key = rng.sample(words, 6)
        verb = rng.choice(_VERBS)
        amount = rng.randint(2, 90)
        sents = [
            f"The {place} {actor} {verb} its {key[0]} program on Monday, citing pressure on {key[1]} and {key[2]}.",
            f"The change affects {amount} percent of {key[3]} across the region, according to figures released this week.",
            f"Managers said {key[4]} would be reviewed before the {key[5]} season begins.",
        ]
        body = list(sents)
        for j in range(rng.randint(5, 9)):
            a, b = rng.sample(words, 2)
            body.append(f"One {actor} member noted that {a} and {b} had been discussed at length in {place}.")
            if rng.random() < 0.5:
                body.append(rng.choice(_FILLER))
        tldr = (
            f"The {place} {actor} {verb} its {key[0]} program, citing pressure on {key[1]} and {key[2]}. "
            f"The move affects {amount} percent of {key[3]} in the region. "
            f"Managers plan to review {key[4]} before the {key[5]} season, and further discussion of "
            f"{words[0]} and {words[1]} is expected from the {actor} in the coming months."
        )
        rows.append(Row(id=f"tldr-{i:04d}", input=" ".join(body), output=tldr, topic=topic))
    return rows


_ROUTES = {
    "billing": ["I was charged twice on my invoice", "my card payment failed", "please refund the last charge",
                "the invoice total looks wrong", "our receipt shows the wrong VAT number", "the annual renewal charge surprised us",
                "can you update the billing address on our account", "a refund from March never arrived"],
    "sales": ["we want a quote for 50 seats", "can we book a demo of the enterprise plan", "what does the pricing look like for a team",
              "interested in upgrading our contract", "do you offer volume discounts for schools", "our procurement team needs a proposal",
              "we are comparing vendors and would like a call", "is there a startup plan for ten users"],
    "support": ["the app crashes when I log in", "I cannot reset my password", "the export button returns an error",
                "sync stopped working this morning", "the dashboard shows a blank page", "two-factor codes never arrive",
                "uploads fail with a timeout", "the mobile app logs me out every hour"],
    "spam": ["congratulations you won a free cruise", "cheap watches best price click here", "earn money fast from home",
             "your account needs crypto verification now", "claim your lottery prize today", "hot singles in your area",
             "buy followers for your brand cheap", "urgent wire transfer from a prince"],
}
_GREETINGS = ["Hi team,", "Hello,", "Good morning,", "Hey there,", "Dear support,", "Hi all,"]
_SIGNOFFS = ["Thanks, Ana", "Best, Tom", "Regards, Li", "Cheers, Sam", "Kind regards, Omar", "Thank you, Eva"]
_CONTEXT = ["", " This is the second time I am writing.", " We are on the Pro plan.", " Sent from my phone.",
            " Our account is under the Lyon office.", " Please reply today.", " I hope this reaches the right person."]


def routing_rows(n: int, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    labels = sorted(_ROUTES)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        msg = rng.choice(_ROUTES[label])
        greet, sign, ctx = rng.choice(_GREETINGS), rng.choice(_SIGNOFFS), rng.choice(_CONTEXT)
        rows.append(Row(id=f"route-{i:04d}", input=f"{greet} {msg}.{ctx} {sign}", output=label, topic=label))
    return rows


def leads_rows(n: int, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    companies = ["Acme Corp", "Globex", "Initech", "Umbrella Labs", "Stark Freight", "Wayne Foods", "Hooli", "Vandelay Imports"]
    intents = {
        "interested": "Thanks for reaching out, we would like to schedule a call next week about the {p} rollout",
        "not_interested": "We are not looking for a new {p} vendor and please remove us from the list",
        "later": "Timing is not right for the {p} project, please follow up next quarter when budgets reopen",
    }
    products = ["analytics", "payroll", "logistics", "security", "hiring"]
    rows = []
    for i in range(n):
        intent = sorted(intents)[i % 3]
        company = rng.choice(companies)
        product = rng.choice(products)
        text = intents[intent].format(p=product)
        body = f"{text}. {rng.choice(['Best', 'Regards', 'Thanks'])}, {rng.choice(['Maria', 'Jon', 'Priya'])} at {company}"
        out = {"intent": intent, "company": company, "summary": f"{company} replied about the {product} offer: {text.split(',')[0].lower()}"}
        rows.append(Row(id=f"lead-{i:04d}", input=body, output=json.dumps(out), topic=intent))
    return rows
