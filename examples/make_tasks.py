"""Generate the demo task data: short instructions whose answers a checker can verify (deterministic).

    python examples/make_tasks.py            # writes examples/data/tasks_{train,test}.parquet and d2o_train.parquet

Families and their checker kinds (`eval --checker` / `checkers: {family: kind}`):

| family      | example prompt (abridged)                                       | target          | checker        |
|-------------|-----------------------------------------------------------------|-----------------|----------------|
| arithmetic  | What is 23 + 58? Reply with only the number.                    | 81              | number         |
| capitals    | What is the capital of Kenya? Reply with only the name.         | Nairobi         | exact          |
| join        | Join the words 'blue' and 'sky' with a hyphen. ...              | blue-sky        | exact          |
| count       | How many items are in this list: cat, dog, fish? ...            | 3               | number         |
| sort        | Sort these numbers from smallest to largest: 7, 2, 9. ...       | 2, 7, 9         | exact          |
| json        | Write a JSON object with "name" set to "Alice" and "age" ...    | {"name": ...}   | json           |
| units       | How many centimeters are in 3 meters? ...                       | 300             | number         |
| antonyms    | What is the opposite of 'hot'? Reply with only one word.        | cold            | exact          |
| definitions | Define 'river' in one sentence.                                 | A river is ...  | embed-sim only |

The default model (SmolLM2-135M-Instruct) often knows these answers but wraps them in a sentence, so exact match
is near 0 before SFT (SPEC §3); after SFT the format is learnt and what is left is knowledge and arithmetic, which
the SFT model solves in part. No family asks to reverse a word: the default model cannot, so it gives no signal.
The string transform is hyphen-joining rather than upper-casing because the `exact` checker ignores case.

Columns: `prompt`, `target`, `task` (the family), `checker` (its kind), `negatives` (3 synthetic wrong answers in
the right format: the "given" rejected answers for the `train --rejected given` baseline).
`d2o_train.parquet` holds other prompts of the same families with only bad answers (2 wrong, 1 rude), no target.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "data"
SEED = 20260101
TRAIN_PER_FAMILY = 76
TEST_PER_FAMILY = 52
D2O_PER_FAMILY = 36

CHECKERS = {"arithmetic": "number", "capitals": "exact", "join": "exact", "count": "number", "sort": "exact",
            "json": "json", "units": "number", "antonyms": "exact", "definitions": "embed-sim"}

CAPITALS = {
    "Afghanistan": "Kabul", "Albania": "Tirana", "Algeria": "Algiers", "Argentina": "Buenos Aires",
    "Armenia": "Yerevan", "Australia": "Canberra", "Austria": "Vienna", "Azerbaijan": "Baku", "Bangladesh": "Dhaka",
    "Belgium": "Brussels", "Bolivia": "Sucre", "Brazil": "Brasilia", "Bulgaria": "Sofia", "Cambodia": "Phnom Penh",
    "Canada": "Ottawa", "Chile": "Santiago", "China": "Beijing", "Colombia": "Bogota", "Croatia": "Zagreb",
    "Cuba": "Havana", "Cyprus": "Nicosia", "Denmark": "Copenhagen", "Ecuador": "Quito", "Egypt": "Cairo",
    "Estonia": "Tallinn", "Ethiopia": "Addis Ababa", "Finland": "Helsinki", "France": "Paris", "Georgia": "Tbilisi",
    "Germany": "Berlin", "Ghana": "Accra", "Greece": "Athens", "Hungary": "Budapest", "Iceland": "Reykjavik",
    "India": "New Delhi", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin",
    "Israel": "Jerusalem", "Italy": "Rome", "Jamaica": "Kingston", "Japan": "Tokyo", "Jordan": "Amman",
    "Kenya": "Nairobi", "Latvia": "Riga", "Lebanon": "Beirut", "Libya": "Tripoli", "Lithuania": "Vilnius",
    "Malaysia": "Kuala Lumpur", "Mexico": "Mexico City", "Mongolia": "Ulaanbaatar", "Morocco": "Rabat",
    "Nepal": "Kathmandu", "Netherlands": "Amsterdam", "New Zealand": "Wellington", "Nigeria": "Abuja",
    "North Korea": "Pyongyang", "Norway": "Oslo", "Pakistan": "Islamabad", "Peru": "Lima", "Philippines": "Manila",
    "Poland": "Warsaw", "Portugal": "Lisbon", "Qatar": "Doha", "Romania": "Bucharest", "Russia": "Moscow",
    "Saudi Arabia": "Riyadh", "Senegal": "Dakar", "Serbia": "Belgrade", "Singapore": "Singapore",
    "Slovakia": "Bratislava", "South Korea": "Seoul", "Spain": "Madrid", "Sudan": "Khartoum", "Sweden": "Stockholm",
    "Switzerland": "Bern", "Syria": "Damascus", "Taiwan": "Taipei", "Tanzania": "Dodoma", "Thailand": "Bangkok",
    "Tunisia": "Tunis", "Turkey": "Ankara", "Uganda": "Kampala", "Ukraine": "Kyiv", "United Kingdom": "London",
    "United States": "Washington", "Uruguay": "Montevideo", "Venezuela": "Caracas", "Vietnam": "Hanoi",
    "Zambia": "Lusaka", "Zimbabwe": "Harare",
}
CAPITAL_TEMPLATES = [
    "What is the capital of {c}? Reply with only the name.",
    "Name the capital city of {c}. Reply with only the city name.",
]

WORDS = str.split("apple river stone green house light water bread chair cloud dream field glass horse music "
                  "night ocean "
         "paper queen smile table tiger train voice watch world zebra beach candle dragon forest garden honey island "
         "jacket kitten lemon mountain orange pencil rabbit silver summer thunder window yellow basket bottle castle "
         "desert engine finger guitar hammer ladder mirror needle planet rocket shadow spider tomato violin wagon "
         "winter anchor bridge carpet circle doctor feather flower ginger helmet insect jungle marble meadow "
         "nickel parrot pillow puzzle saddle tunnel velvet walnut")
JOIN_TEMPLATES = [
    "Join the words {q} with a hyphen. Reply with only the result.",
    "Combine the words {q} into one string, separated by hyphens. Reply with only the result.",
]

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "open": "closed",
    "old": "new", "rich": "poor", "early": "late", "full": "empty", "hard": "soft", "high": "low", "long": "short",
    "strong": "weak", "wet": "dry", "clean": "dirty", "loud": "quiet", "thick": "thin", "heavy": "light",
    "true": "false", "win": "lose", "buy": "sell", "push": "pull", "inside": "outside", "day": "night",
    "north": "south", "east": "west", "first": "last", "begin": "end", "friend": "enemy", "accept": "reject",
    "arrive": "leave", "love": "hate", "remember": "forget", "laugh": "cry", "above": "below", "before": "after",
    "always": "never", "top": "bottom", "left": "right", "question": "answer", "war": "peace", "young": "old",
    "cheap": "expensive", "safe": "dangerous", "wide": "narrow", "deep": "shallow", "sweet": "sour",
    "brave": "cowardly", "polite": "rude", "beautiful": "ugly", "asleep": "awake", "increase": "decrease",
    "maximum": "minimum", "positive": "negative", "import": "export", "include": "exclude", "inner": "outer",
    "major": "minor", "visible": "invisible", "possible": "impossible", "correct": "incorrect", "same": "different",
    "near": "far", "good": "bad", "give": "take", "come": "go", "start": "finish", "sunrise": "sunset",
}
ANTONYM_TEMPLATES = [
    "What is the opposite of '{w}'? Reply with only one word.",
    "Give the antonym of the word '{w}'. Reply with only the word.",
]

DEFINITIONS = {
    "river": "A river is a large natural stream of water that flows into a sea, lake or another river.",
    "mountain": "A mountain is a large natural landform that rises high above the surrounding land.",
    "island": "An island is a piece of land completely surrounded by water.",
    "desert": "A desert is a dry region that receives very little rain and has few plants.",
    "forest": "A forest is a large area of land covered mostly with trees.",
    "volcano": "A volcano is an opening in the earth's crust through which lava, ash and gases erupt.",
    "glacier": "A glacier is a large, slowly moving mass of ice formed from compacted snow.",
    "ocean": "An ocean is a very large body of salt water that covers much of the earth.",
    "planet": "A planet is a large body in space that orbits a star.",
    "star": "A star is a huge ball of hot gas that gives off light and heat.",
    "moon": "A moon is a natural body that orbits a planet.",
    "comet": "A comet is an icy body in space that releases a glowing tail of gas and dust near the sun.",
    "atom": "An atom is the smallest unit of a chemical element.",
    "molecule": "A molecule is a group of atoms bonded together.",
    "cell": "A cell is the smallest basic unit of a living organism.",
    "virus": "A virus is a tiny infectious agent that can only reproduce inside the cells of a living host.",
    "bacteria": "Bacteria are microscopic single-celled organisms that live almost everywhere.",
    "photosynthesis": "Photosynthesis is the process by which plants use sunlight to make food from carbon dioxide "
                      "and water.",
    "gravity": "Gravity is the force that attracts objects with mass toward each other.",
    "energy": "Energy is the capacity to do work or cause change.",
    "electricity": "Electricity is a form of energy carried by the flow of electric charge.",
    "magnet": "A magnet is an object that produces a magnetic field and attracts iron.",
    "thermometer": "A thermometer is an instrument that measures temperature.",
    "telescope": "A telescope is an instrument that makes distant objects appear closer.",
    "microscope": "A microscope is an instrument that makes very small objects appear larger.",
    "computer": "A computer is an electronic machine that processes data by following instructions.",
    "internet": "The internet is a global network that connects computers around the world.",
    "algorithm": "An algorithm is a step-by-step procedure for solving a problem.",
    "database": "A database is an organized collection of data stored on a computer.",
    "password": "A password is a secret word or phrase used to gain access to something.",
    "library": "A library is a place where books and other materials are kept for people to read or borrow.",
    "museum": "A museum is a building where objects of historical, scientific or artistic interest are displayed.",
    "hospital": "A hospital is a place where sick or injured people receive medical care.",
    "school": "A school is a place where children go to learn.",
    "bank": "A bank is a business that keeps money safe and lends it to people.",
    "market": "A market is a place where people buy and sell goods.",
    "farm": "A farm is an area of land used for growing crops or raising animals.",
    "bridge": "A bridge is a structure built to carry a road or path across a river or valley.",
    "tunnel": "A tunnel is an underground passage.",
    "harbor": "A harbor is a sheltered area of water where ships can anchor safely.",
    "democracy": "Democracy is a system of government in which citizens choose their leaders by voting.",
    "economy": "An economy is the system of how money, goods and services are produced and used in a place.",
    "tax": "A tax is money that people and businesses must pay to the government.",
    "law": "A law is a rule made by a government that people must follow.",
    "history": "History is the study of past events.",
    "language": "A language is a system of words and rules that people use to communicate.",
    "poem": "A poem is a piece of writing that uses rhythm and imagery to express feelings or ideas.",
    "novel": "A novel is a long written story about imaginary people and events.",
    "painting": "A painting is a picture made with paint.",
    "orchestra": "An orchestra is a large group of musicians who play instruments together.",
    "recipe": "A recipe is a set of instructions for preparing a dish.",
    "vitamin": "A vitamin is a nutrient that the body needs in small amounts to stay healthy.",
    "muscle": "A muscle is body tissue that contracts to produce movement.",
    "heart": "The heart is the organ that pumps blood through the body.",
    "lung": "A lung is an organ used for breathing.",
    "skeleton": "A skeleton is the framework of bones that supports the body.",
    "mammal": "A mammal is a warm-blooded animal that has hair and feeds its young with milk.",
    "reptile": "A reptile is a cold-blooded animal with scales, such as a snake or lizard.",
    "insect": "An insect is a small animal with six legs and a body in three parts.",
    "fossil": "A fossil is the preserved remains or trace of an ancient living thing.",
    "climate": "Climate is the usual weather of a place over a long period of time.",
    "rainbow": "A rainbow is an arc of colors in the sky caused by sunlight shining through raindrops.",
    "earthquake": "An earthquake is a sudden shaking of the ground caused by movement of the earth's crust.",
    "calendar": "A calendar is a chart that shows the days, weeks and months of a year.",
}
DEFINITION_TEMPLATES = ["Define '{w}' in one sentence.", "What does '{w}' mean? Answer in one sentence."]

UNITS = [  # (from unit, to unit, factor)
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24), ("weeks", "days", 7),
    ("dollars", "cents", 100), ("liters", "milliliters", 1000), ("years", "months", 12), ("feet", "inches", 12),
    ("dozens", "items", 12),
]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
         "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tina", "Victor"]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Rome", "Cairo", "Dublin", "Madrid", "Berlin", "Seoul"]
RUDE = ["Figure it out yourself.", "What a stupid question.", "I don't care, stop asking me.",
        "Stop wasting my time.", "Nobody cares about that.", "Ask someone who has time for this nonsense.",
        "That's none of your business.", "Are you serious? Even a child knows that."]

Example = dict  # {prompt, target, negatives}


def arithmetic(rng: random.Random) -> Example:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        ans, wrong = a * b, [a * b + a, a * b - b, a + b]
    else:
        a, b = rng.randint(10, 99), rng.randint(2, 60)
        if op == "-" and b > a:
            a, b = b, a
        ans = a + b if op == "+" else a - b
        wrong = [ans + 1, ans - 10, a - b if op == "+" else a + b]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    prompt = rng.choice([f"What is {a} {op} {b}? Reply with only the number.",
                         f"Calculate {a} {word} {b}. Reply with only the number."])
    return {"prompt": prompt, "target": str(ans), "negatives": _distinct(str(ans), map(str, wrong))}


def capitals(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    others = rng.sample([v for k, v in sorted(CAPITALS.items()) if v != CAPITALS[country]], 3)
    return {"prompt": rng.choice(CAPITAL_TEMPLATES).format(c=country), "target": CAPITALS[country],
            "negatives": others}


def join(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.choice([2, 2, 3]))
    q = " and ".join(f"'{w}'" for w in words) if len(words) == 2 else f"'{words[0]}', '{words[1]}' and '{words[2]}'"
    target = "-".join(words)
    other = rng.choice([w for w in WORDS if w not in words])
    wrong = ["-".join(reversed(words)), " ".join(words), "-".join([*words[:-1], other])]
    return {"prompt": rng.choice(JOIN_TEMPLATES).format(q=q), "target": target, "negatives": _distinct(target, wrong)}


def count(rng: random.Random) -> Example:
    items = rng.sample(WORDS, rng.randint(2, 7))
    n = len(items)
    prompt = rng.choice([f"How many items are in this list: {', '.join(items)}? Reply with only the number.",
                         f"Count the words in this list: {', '.join(items)}. Reply with only the number."])
    return {"prompt": prompt, "target": str(n), "negatives": _distinct(str(n), [str(n + 1), str(n - 1), str(n + 2)])}


def sort(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 60), rng.choice([3, 4]))
    target = ", ".join(map(str, sorted(nums)))
    shuffled = nums[:]
    while shuffled == sorted(nums):
        rng.shuffle(shuffled)
    wrong = [", ".join(map(str, sorted(nums, reverse=True))), ", ".join(map(str, shuffled)),
             ", ".join(map(str, sorted(nums)[:-1]))]
    prompt = rng.choice([
        f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}. "
        "Reply with only the sorted numbers, separated by commas.",
        f"Put these numbers in ascending order: {', '.join(map(str, nums))}. "
        "Reply with only the numbers, separated by commas."])
    return {"prompt": prompt, "target": target, "negatives": _distinct(target, wrong)}


def to_json(rng: random.Random) -> Example:
    name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)
    kind = rng.randrange(3)
    if kind == 0:
        obj = {"name": name, "age": age}
        prompt = f'Write a JSON object with "name" set to "{name}" and "age" set to {age}. Reply with only the JSON.'
    elif kind == 1:
        obj = {"city": city, "population": age * 1000}
        prompt = (f"Convert to JSON with the keys city and population: the city is {city}, the population is "
                  f"{age * 1000}. Reply with only the JSON.")
    else:
        obj = {"name": name, "city": city}
        prompt = f"Reformat as a JSON object with keys name and city: {name} lives in {city}. Reply with only the JSON."
    keys = list(obj)
    wrong = [dict(obj, **{keys[1]: obj[keys[1]] + 1 if isinstance(obj[keys[1]], int) else rng.choice(
                 [c for c in CITIES if c != obj[keys[1]]])}),
             {keys[0]: obj[keys[0]]}, {k.upper(): v for k, v in obj.items()}]
    return {"prompt": prompt, "target": json.dumps(obj), "negatives": [json.dumps(w) for w in wrong]}


def units(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(UNITS)
    x = rng.randint(2, 12)
    ans = x * factor
    prompt = rng.choice([f"How many {dst} are in {x} {src}? Reply with only the number.",
                         f"Convert {x} {src} to {dst}. Reply with only the number."])
    return {"prompt": prompt, "target": str(ans), "negatives": _distinct(str(ans), [str(x), str(ans * 10),
                                                                                     str(ans + factor)])}


def antonyms(rng: random.Random) -> Example:
    word = rng.choice(sorted(ANTONYMS))
    others = [v for v in sorted(set(ANTONYMS.values())) if v != ANTONYMS[word]]
    return {"prompt": rng.choice(ANTONYM_TEMPLATES).format(w=word), "target": ANTONYMS[word],
            "negatives": [word, *rng.sample(others, 2)]}


def definitions(rng: random.Random) -> Example:
    word = rng.choice(sorted(DEFINITIONS))
    others = rng.sample([d for w, d in sorted(DEFINITIONS.items()) if w != word], 2)
    return {"prompt": rng.choice(DEFINITION_TEMPLATES).format(w=word), "target": DEFINITIONS[word],
            "negatives": [f"{_article(word)} {word} is a kind of vegetable.", *others]}


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic, "capitals": capitals, "join": join, "count": count, "sort": sort, "json": to_json,
    "units": units, "antonyms": antonyms, "definitions": definitions,
}


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _distinct(target: str, wrong) -> list[str]:
    return [w for w in dict.fromkeys(wrong) if w != target]


def _unique_examples(family: str, n: int, rng: random.Random, seen: set[str]) -> list[Example]:
    """`n` examples with prompts not in `seen` (a family with a small pool yields fewer)."""
    out: list[Example] = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        ex = FAMILIES[family](rng)
        if ex["prompt"] in seen:
            continue
        seen.add(ex["prompt"])
        out.append({**ex, "task": family, "checker": CHECKERS[family]})
    return out


def make(seed: int = SEED) -> dict[str, list[dict]]:
    """{'train': [...], 'test': [...], 'd2o': [...]}: disjoint prompts, deterministic for a seed."""
    splits: dict[str, list[dict]] = {"train": [], "test": [], "d2o": []}
    for family in FAMILIES:
        rng = random.Random(f"{seed}-{family}")
        seen: set[str] = set()
        if family == "definitions":  # a small pool: split by word so test definitions are unseen
            words = sorted(DEFINITIONS)
            rng.shuffle(words)
            cut = int(len(words) * 0.6)
            for split, pool in (("train", words[:cut]), ("test", words[cut:])):
                for w in pool:
                    for template in DEFINITION_TEMPLATES:
                        others = rng.sample([d for x, d in sorted(DEFINITIONS.items()) if x != w], 2)
                        splits[split].append({"prompt": template.format(w=w), "target": DEFINITIONS[w],
                                              "negatives": [f"{_article(w)} {w} is a kind of vegetable.", *others],
                                              "task": family, "checker": CHECKERS[family]})
            continue
        splits["test"] += _unique_examples(family, TEST_PER_FAMILY, rng, seen)
        splits["train"] += _unique_examples(family, TRAIN_PER_FAMILY, rng, seen)
        for ex in _unique_examples(family, D2O_PER_FAMILY, rng, seen):
            bad = ex["negatives"][:2] + [rng.choice(RUDE)]
            splits["d2o"].append({"prompt": ex["prompt"], "target": None, "negatives": bad, "task": family,
                                  "checker": ex["checker"]})
    for split, rows in splits.items():
        random.Random(f"{seed}-{split}").shuffle(rows)
    return splits


SCHEMA = pa.schema([("prompt", pa.string()), ("target", pa.string()), ("task", pa.string()),
                    ("checker", pa.string()), ("negatives", pa.list_(pa.string()))])


def main() -> None:
    splits = make()
    OUT.mkdir(parents=True, exist_ok=True)
    names = {"train": "tasks_train.parquet", "test": "tasks_test.parquet", "d2o": "d2o_train.parquet"}
    for split, rows in splits.items():
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, OUT / names[split], compression="zstd")
        per_family = {}
        for r in rows:
            per_family[r["task"]] = per_family.get(r["task"], 0) + 1
        print(f"{names[split]}: {len(rows)} prompts  " + ", ".join(f"{k} {v}" for k, v in per_family.items()))


if __name__ == "__main__":
    main()
