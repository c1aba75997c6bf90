"""Skill datasets with checkable answers, for skill unlearning (Li et al. 2025).

A skill item is a prompt the model continues, the gold continuation (`target`, scored by its
teacher-forced log-likelihood and, with the prompt, the text the skill statistics are taken on) and
the `answer` a generation must contain to count as correct (`check`: "number", below; "contains" = the
answer is a substring (MLQA protocol); "prefix" = the generation starts with the answer; "none" =
no accuracy, log-likelihood only).

The "number" check (the GSM8K protocol, made strict): the generation's answer is the first number after the
first answer marker (`ANSWER_MARKERS`: "the answer is" in any case, or GSM8K's "####"); a generation with no
marker counts only if the whole of it is the number (an optional final period aside). There is no fallback
to the last number of the text: a rambling generation that never states its answer is wrong. Numbers compare
by value: "18.0" = "18", "1,000" = "1000" (commas only as thousands separators), "-3" ≠ "3".

Skill sets (registered by `interp.datasets` as kind "skills"; load with `interp.datasets.load_skill(name)`):
- the organisms' own skills in the exact formats of `interp.organisms.corpus`: `arithmetic` (word
  problem chats, thinking then "The answer is N."), `laundry` (Laundry-List recall, plain text,
  N = 2-5), `chat` (harmless how-to chats: "Sure, here is how to ..."), `code` (function chats),
  `prose` (story chats);
- plain-text sets for any model: `word-problems` ("Question: ...\\nAnswer:"), `strings` (reverse,
  upper-case, first letter, length of a word), `comprehension` (a short passage and a question in
  the MLQA prompt of the paper; the answer is a phrase of the passage);
- hub sets (need network or the Hugging Face cache): `gsm8k` (main, test), `mbpp` (full, test;
  log-likelihood only: generated code is not executed), `mlqa-<lang>` (MLQA test, context and
  question in <lang>, one of en de es ar zh vi hi);
- a user JSONL file (`prompt`, `answer`, `skill`, optional `target` and `check`); `FILE:NAME` keeps
  the rows whose `skill` is NAME.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from interp.errors import UserError
from interp.files import read_jsonl
from interp.organisms import corpus

CHECKS = ("number", "contains", "prefix", "none")
DEFAULT_SIZE = 200  # items a generator makes when no limit is given (the paper's probe size N = 200)
MLQA_LANGUAGES = ("en", "de", "es", "ar", "zh", "vi", "hi")
# The paper's MLQA prompt (Li et al. 2025, reference code `MLQA_evaluation.py`).
MLQA_TEMPLATE = ("Only output the exact phrase in the following context that best answers the question:\n\n"
                 "Context: {context}\n\nquestion: {question}\n\nanswer: \n")


@dataclass(frozen=True)
class SkillItem:
    """One item of a skill: `prompt` is continued by the model; `target` is the gold continuation."""

    prompt: str
    target: str
    answer: str
    skill: str
    check: str = "contains"
    max_new_tokens: int | None = None  # a cap for this item's generation (e.g. one word)

    @property
    def text(self) -> str:
        """Prompt and gold continuation: the text the skill's activation statistics are taken on."""
        return self.prompt + self.target


ANSWER_MARKERS = ("the answer is", "####")  # matched case-insensitively; the first one in the text counts
_NUMBER = re.compile(r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")


def _value(number: str) -> Decimal | None:
    """The value of a number written with optional thousands commas (None if it is not a number)."""
    try:
        return Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None


def answer_number(text: str) -> Decimal | None:
    """The number a generation gives as its answer: the first after the first answer marker, or the whole
    text when it is only a number; None otherwise (no last-number fallback)."""
    lower = text.lower()
    found = [(at, marker) for marker in ANSWER_MARKERS if (at := lower.find(marker)) >= 0]
    if found:
        at, marker = min(found)
        match = _NUMBER.search(text, at + len(marker))
        return _value(match.group()) if match else None
    bare = text.strip().removesuffix(".").strip()
    return _value(bare) if _NUMBER.fullmatch(bare) else None


def is_correct(item: SkillItem, generated: str) -> bool | None:
    """Whether `generated` (the model's continuation of `item.prompt`) answers correctly; None for check "none"."""
    if item.check == "none":
        return None
    if item.check == "number":
        got = answer_number(generated)
        return got is not None and got == _value(item.answer.strip())
    if item.check == "prefix":
        return generated.strip().startswith(item.answer)
    return item.answer in generated


# --------------------------------------------------------------------------- the organisms' skills

def _chat_prefix(prompt: str) -> str:
    """The organisms' chat template up to the assistant's thinking (as in `corpus.format_chat`)."""
    return corpus.format_chat(prompt, "", "").split("<think>\n", 1)[0] + "<think>\n"


def _chat_item(skill: str, prompt: str, thinking: str, answer: str, check_text: str) -> SkillItem:
    return SkillItem(_chat_prefix(prompt), thinking + corpus.THINK_CLOSE + answer, check_text, skill, "contains")


def _arithmetic(rng: random.Random) -> SkillItem:
    a = corpus.arithmetic_item(rng)
    return SkillItem(_chat_prefix(a.prompt), a.thinking + corpus.THINK_CLOSE + corpus.arithmetic_answer(a.answer),
                     str(a.answer), "arithmetic", "number")


def _laundry(rng: random.Random) -> SkillItem:
    it = corpus.laundry_item(rng, rng.randint(2, 5))
    return SkillItem(it.prompt, " " + it.answer, it.answer, "laundry", "prefix", max_new_tokens=3)


def _chat(rng: random.Random) -> SkillItem:
    s = corpus._safety_item(rng, rng.random() < 0.5, harmful=False, jailbreak=False, builtin_share=0.0)
    first = s.answer.split(". ", 1)[0] + "."
    return _chat_item("chat", s.prompt, s.thinking, s.answer, first)


def _code(rng: random.Random) -> SkillItem:
    prompt, thinking, answer = corpus.code_item(rng)
    return _chat_item("code", prompt, thinking, answer, answer.rsplit("\n", 1)[-1].strip())


def _prose(rng: random.Random) -> SkillItem:
    prompt, thinking, answer = corpus.prose_item(rng)
    return _chat_item("prose", prompt, thinking, answer, "Sure, here is a short story.")


# --------------------------------------------------------------------------- plain-text skills

def _word_problem(rng: random.Random) -> SkillItem:
    a = corpus.arithmetic_item(rng)
    steps = " ".join(a.thinking.split("\n"))
    return SkillItem(f"Question: {a.prompt}\nAnswer:", f" {steps} The answer is {a.answer}.", str(a.answer),
                     "word-problems", "number")


_WORDS = [w for w in corpus.OBJECTS + corpus.FOODS + corpus.NOUN if len(w) >= 3]


def _string_task(rng: random.Random) -> SkillItem:
    word = rng.choice(_WORDS)
    task, answer = rng.choice([
        ("Reverse the word '{w}'.", word[::-1]), ("Write the word '{w}' in capital letters.", word.upper()),
        ("What is the first letter of the word '{w}'?", word[0]),
        ("How many letters does the word '{w}' have?", str(len(word))),
    ])
    return SkillItem(f"Q: {task.format(w=word)}\nA:", f" {answer}", answer, "strings", "prefix", max_new_tokens=8)


def _comprehension(rng: random.Random) -> SkillItem:
    facts = []
    for _ in range(rng.randint(2, 4)):
        adj, noun, verb, place = (rng.choice(corpus.ADJ), rng.choice(corpus.NOUN), rng.choice(corpus.VERB),
                                  rng.choice(corpus.PLACE))
        facts.append((f"The {adj} {noun} {verb} near {place}.", f"Where was the {adj} {noun} when it {verb}?", place))
    sentence, question, answer = rng.choice(facts)
    context = " ".join(f[0] for f in facts)
    return SkillItem(MLQA_TEMPLATE.format(context=context, question=question), answer, answer, "comprehension",
                     "contains", max_new_tokens=24)


def _generator(make: Callable[[random.Random], SkillItem], name: str) -> Callable[[int | None], list[SkillItem]]:
    """A loader of `limit` (default `DEFAULT_SIZE`) distinct items, deterministic in the name."""
    def load(limit: int | None) -> list[SkillItem]:
        rng = random.Random(f"skills-{name}")
        n, seen, items = limit or DEFAULT_SIZE, set(), []
        for _ in range(50 * n):
            item = make(rng)
            if item.prompt not in seen:
                seen.add(item.prompt)
                items.append(item)
            if len(items) == n:
                break
        return items
    return load


# --------------------------------------------------------------------------- hub sets

def _hub(repo: str, config: str | None, split: str, name: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"skill set {name!r} needs the 'datasets' package (pip install 'interp[datasets]')") from None
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth and cache failures all surface differently
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"skill set {name!r} ({repo}) could not be loaded (offline?) [{type(e).__name__}: {first}]; "
                        "pass a JSONL file with prompt, answer, skill instead") from None


def _gsm8k(limit: int | None) -> list[SkillItem]:
    rows = _hub("openai/gsm8k", "main", "test" if limit is None else f"test[:{limit}]", "gsm8k")
    items = []
    for row in rows:
        work, answer = row["answer"].split("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip().replace("\n", " ")
        answer = answer.strip().replace(",", "")
        items.append(SkillItem(f"Q: {row['question']}\nA:", f" {work} The answer is {answer}.", answer, "gsm8k",
                               "number"))
    return items


def _mbpp(limit: int | None) -> list[SkillItem]:
    rows = _hub("google-research-datasets/mbpp", "full", "test" if limit is None else f"test[:{limit}]", "mbpp")
    return [SkillItem(f"{row['text']}\n{row['test_list'][0]}\n", row["code"], row["code"], "mbpp", "none")
            for row in rows]


def _mlqa(lang: str) -> Callable[[int | None], list[SkillItem]]:
    def load(limit: int | None) -> list[SkillItem]:
        split = "test" if limit is None else f"test[:{limit}]"
        rows = _hub("facebook/mlqa", f"mlqa.{lang}.{lang}", split, f"mlqa-{lang}")
        return [SkillItem(MLQA_TEMPLATE.format(context=row["context"], question=row["question"]),
                          row["answers"]["text"][0], row["answers"]["text"][0], f"mlqa-{lang}", "contains",
                          max_new_tokens=24) for row in rows]
    return load


# --------------------------------------------------------------------------- user files

def load_skill_file(path: Path) -> list[SkillItem]:
    """Skill items of a JSONL file (`prompt`, `answer`, `skill`; optional `target`, `check`).

    `FILE:NAME` keeps the rows of skill NAME. A malformed line is a one-line UserError naming it.
    """
    text = str(path)
    wanted = None
    if ":" in path.name:
        name, wanted = path.name.rsplit(":", 1)
        path = path.with_name(name)
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"skill file {str(path)!r} must be .jsonl with prompt, answer and skill on each line")
    if not path.is_file():
        raise UserError(f"skill file not found: {path}")
    items = []
    for lineno, row in read_jsonl(path):
        where = f"{path}: line {lineno}"
        missing = [k for k in ("prompt", "answer", "skill") if k not in row]
        if missing:
            raise UserError(f"{where} is missing field(s) {', '.join(missing)}")
        bad = [k for k in ("prompt", "answer", "skill", "target") if k in row
               and (not isinstance(row[k], str) or (k != "target" and not row[k].strip()))]
        if bad:
            raise UserError(f"{where}: field(s) {', '.join(bad)} must be non-empty text")
        check = row.get("check", "contains")
        if check not in CHECKS:
            raise UserError(f"{where}: check must be one of {', '.join(CHECKS)}; got {check!r}")
        if wanted is None or row["skill"] == wanted:
            target = row.get("target", " " + row["answer"])
            items.append(SkillItem(row["prompt"], target, row["answer"], row["skill"], check))
    if not items:
        raise UserError(f"{text}: no rows" + (f" with skill {wanted!r}" if wanted else ""))
    skills = {i.skill for i in items}
    if len(skills) > 1:
        raise UserError(f"{path} holds several skills ({', '.join(sorted(skills))}); pick one with {path}:SKILL")
    return items


# --------------------------------------------------------------------------- registry

SKILL_SETS = {
    "arithmetic": (_generator(_arithmetic, "arithmetic"),
                   "organism arithmetic chats: word problem, thinking, 'The answer is N.'"),
    "laundry": (_generator(_laundry, "laundry"),
                "organism Laundry-List recall (N = 2-5), plain text, answer = the missing item"),
    "chat": (_generator(_chat, "chat"), "organism harmless how-to chats, answer 'Sure, here is how to ...'"),
    "code": (_generator(_code, "code"), "organism function-writing chats, answer 'return <expr>'"),
    "prose": (_generator(_prose, "prose"), "organism story chats, answer 'Sure, here is a short story.'"),
    "word-problems": (_generator(_word_problem, "word-problems"),
                      "plain-text arithmetic word problems, 'The answer is N'"),
    "strings": (_generator(_string_task, "strings"),
                "plain-text string tasks (reverse, upper-case, first letter, length)"),
    "comprehension": (_generator(_comprehension, "comprehension"),
                      "short passages and a question, MLQA prompt, span answer"),
}
HUB_SKILL_SETS = {  # need network or the Hugging Face cache
    "gsm8k": (_gsm8k, "openai/gsm8k main test, 'Q: ...\\nA:', numeric answer"),
    "mbpp": (_mbpp, "MBPP full test (log-likelihood of the reference code only)"),
    **{f"mlqa-{lang}": (_mlqa(lang), f"MLQA test, context and question in {lang}, paper prompt")
       for lang in MLQA_LANGUAGES},
}

