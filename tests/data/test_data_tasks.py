"""Synthetic tasks: determinism, settings, verifiers accept references and reject corruptions,
graded scores, imperfect demonstrations, and the module:function judge."""

import importlib

import numpy as np
import pytest

from jaxselm.data import tasks
from jaxselm.errors import ConfigError, DataError

SMALL = {
    "sort": {"min_items": 2, "max_items": 5},
    "copy": {"vocab_size": 16, "num_tokens": 6, "num_blanks": 10},
    "count": {"num_vars": 3, "min_ops": 10, "max_ops": 40},
    "flipflop": {"length": 20, "p_ignore": 0.8},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_reference_accepted_corruption_rejected(name):
    task = tasks.make_task(name, **SMALL[name])
    tok = task.tokenizer()
    rng = np.random.default_rng(0)
    for ex in tasks.generate_examples(task, 40, seed=3):
        prompt, answer = ex["prompt"], ex["answer"]
        assert prompt.split()[0] == task.keyword
        assert tasks.verify(prompt, answer) and tasks.score(prompt, answer) == 1.0
        assert task.score(prompt, answer) == 1.0
        bad = task.corrupt(prompt, answer, rng)
        assert bad != answer and not tasks.verify(prompt, bad)
        assert 0.0 <= tasks.score(prompt, bad) < 1.0
        assert tasks.score(prompt, "") < 1.0 and tasks.score(prompt, answer + " 0") < 1.0
        # Every word is in the task's vocabulary: no unknown ids.
        assert tok.unk_id not in tok.encode(prompt + " " + answer)
        assert tok.decode(tok.encode(prompt)) == prompt


def test_generation_is_deterministic_and_independent_of_count():
    task = tasks.make_task("sort")
    first = list(tasks.generate_examples(task, 5, seed=11))
    assert first == list(tasks.generate_examples(task, 5, seed=11))
    assert first[3] == next(tasks.generate_examples(task, 1, seed=11, start=3))
    assert first != list(tasks.generate_examples(task, 5, seed=12))
    assert first != list(tasks.generate_examples(task, 5, seed=11, split="test"))
    assert [e["id"] for e in first] == [f"sort/train/{i}" for i in range(5)]


def test_known_answers():
    assert tasks.score("sort 3 1 2 =", "1 2 3") == 1.0
    assert tasks.score("sort 3 1 2 =", "1 3 2") == pytest.approx(1 / 3)
    assert tasks.score("sort 3 1 2 =", "1 2") == pytest.approx(2 / 3)
    assert tasks.score("sort 3 1 2 =", "1 2 3 3") == pytest.approx(3 / 4)
    assert tasks.score("copy t3 _ _ t1 _ t7 =", "t3 t1 t7") == 1.0
    assert tasks.score("copy t3 _ _ t1 _ t7 =", "t3 _ t7") == pytest.approx(2 / 3)
    assert tasks.verify("count a = 0 ; b = 0 ; a ++; pass; a ++; b ++; print a", "2")
    assert tasks.verify("count a = 0 ; a ++; a ++; pass; a = 0 ; a ++; print a", "1")
    assert tasks.verify("count b = 0 ; pass; print b", "0")
    assert not tasks.verify("count a = 0 ; a ++; print a", "0")
    assert tasks.verify("flipflop w 1 i 0 r 1 w 0 i 1 r", "0")
    assert tasks.verify("flipflop w 1 i 0 i 0 r", "1")


def test_task_settings_follow_paper_shapes():
    copy = tasks.make_task("copy", vocab_size=16, num_tokens=12, num_blanks=20)
    ex = copy.example(0, "train", 0)
    body = ex["prompt"].split()[1:-1]
    assert len(body) == 32 and body.count("_") == 20 and len(ex["answer"].split()) == 12
    count = tasks.make_task("count", num_vars=2, min_ops=30, max_ops=30, max_value=10)
    for ex in tasks.generate_examples(count, 30, seed=0):
        words = ex["prompt"].split()
        assert sum(w in (";", "++;", "pass;") for w in words) == 30  # statements
        assert {w for w in words if w.isdigit()} == {"0"}  # a set always resets to 0
    # Weights 1/7/50: passes dominate.
    big = tasks.make_task("count", min_ops=400, max_ops=400)
    w = big.sample(np.random.default_rng(0)).split()
    assert w.count("pass;") > 5 * w.count("++;") > 0
    ff = tasks.make_task("flipflop", length=200, p_ignore=0.98)
    w = ff.sample(np.random.default_rng(1)).split()[1:]
    assert len(w) == 2 * 200 - 1 and w[0] == "w" and w[-1] == "r"
    assert w[0::2].count("i") > 180


def test_sort_demo_task_is_short_and_graded():
    task = tasks.make_task("sort")
    tok = task.tokenizer()
    assert tok.vocab_size <= 16
    for ex in tasks.generate_examples(task, 50, seed=0):
        assert len(tok.encode(ex["answer"])) <= 10
    demos = tasks.make_demonstrations(task, 400, seed=5, corrupt_prob=0.3)
    assert demos == tasks.make_demonstrations(task, 400, seed=5, corrupt_prob=0.3)
    frac = np.mean([d["corrupted"] for d in demos])
    assert 0.2 < frac < 0.4
    for d in demos:
        s = tasks.score(d["prompt"], d["response"])
        assert (s == 1.0) != d["corrupted"]
    assert not any(
        d["corrupted"] for d in tasks.make_demonstrations(task, 20, seed=5, corrupt_prob=0.0)
    )


def test_judge_is_importable_as_module_function():
    module, func = "jaxselm.data.tasks:score".split(":")
    judge = getattr(importlib.import_module(module), func)
    assert judge("sort 2 1 =", "1 2") == 1.0


def test_errors():
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        tasks.make_task("nope")
    with pytest.raises(ConfigError, match=r"tasks.sort.max_itemz: unknown setting"):
        tasks.make_task("sort", max_itemz=3)
    with pytest.raises(ConfigError, match=r"tasks.sort.min_items"):
        tasks.make_task("sort", min_items=6, max_items=5)
    with pytest.raises(ConfigError, match=r"tasks.flipflop.p_ignore"):
        tasks.make_task("flipflop", p_ignore=1.5)
    with pytest.raises(DataError, match="task keyword"):
        tasks.score("what is 2 + 2?", "4")
    with pytest.raises(DataError, match="malformed count prompt"):
        tasks.score("count a ++; print a", "1")  # an increment of a variable never set
    with pytest.raises(DataError, match="malformed count prompt"):
        tasks.score("count a = 1 ; print a", "1")  # RAM's sets write 0 only
    with pytest.raises(ConfigError, match="corrupt_prob"):
        tasks.make_demonstrations(tasks.make_task("sort"), 2, seed=0, corrupt_prob=2.0)


# -- the natural-language chat task ----------------------------------------------------------------

CALC = "Calculate 75 + 94. Reply with just the final number, nothing else."


def test_arithmetic_examples_are_deterministic_chat_prompts():
    task = tasks.make_task("arithmetic")
    assert task.chat and task.keyword == "Calculate"
    first = list(tasks.generate_examples(task, 20, seed=7, split="test"))
    assert first == list(tasks.generate_examples(task, 20, seed=7, split="test"))
    assert first[5] == task.example(7, "test", 5)
    assert first[5] == next(tasks.generate_examples(task, 1, seed=7, split="test", start=5))
    assert first != list(tasks.generate_examples(task, 20, seed=7, split="train"))
    assert first != list(tasks.generate_examples(task, 20, seed=8, split="test"))
    for i, ex in enumerate(first):
        assert ex["id"] == f"arithmetic/test/{i}"
        assert ex["messages"] == [{"role": "user", "content": ex["prompt"]}]
        assert ex["prompt"].split()[0] == "Calculate"
        assert ex["prompt"].endswith("Reply with just the final number, nothing else.")
        a, op, b = ex["prompt"].split()[1:4]
        assert op == "+" and 10 <= int(a) <= 99 and 10 <= int(b.rstrip(".")) <= 99
        assert ex["answer"] == str(int(a) + int(b.rstrip(".")))
        assert tasks.score(ex["prompt"], ex["answer"]) == 1.0


def test_arithmetic_settings():
    task = tasks.make_task("arithmetic", min_value=2, max_value=30, ops="+-*")
    seen = set()
    for ex in tasks.generate_examples(task, 200, seed=0):
        a, op, b = ex["prompt"].split()[1:4]
        a, b = int(a), int(b.rstrip("."))
        seen.add(op)
        assert 2 <= a <= 30 and 2 <= b <= 30
        assert int(ex["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
    assert seen == {"+", "-", "*"}
    for bad in ({"ops": ""}, {"ops": "+/"}, {"ops": "++"}, {"min_value": -1}):
        with pytest.raises(ConfigError, match=r"tasks.arithmetic\."):
            tasks.make_task("arithmetic", **bad)
    with pytest.raises(ConfigError, match="max_value"):
        tasks.make_task("arithmetic", min_value=50, max_value=20)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        task.tokenizer()


@pytest.mark.parametrize(
    "response",
    [
        "169",
        " 169\n",
        "169.",
        "**169**",
        "The answer is 169.",
        "Answer: 169",
        "The final number is 169.",
        "75 + 94 = 169",
        "75+94=169",
        "75 + 94 = 70 + 4 + 90 + 5 = 169",
        "Sure! 169",
        "169.0",
        "To add 75 and 94, we get 169.",
        "169. Let me know if you have another question!",
        "75 + 94 = 169\n\nI'm ready to help. What's your next question?",
        "The sum is 169, which is 4 more than 165.",
        "75 + 94 is 169, which is a mix of the numbers 1 and 2.",
        "Adding them: 75 + 94 makes 169 (2 three-digit numbers would make more).",
    ],
)
def test_arithmetic_verifier_accepts_the_answer_in_any_format(response):
    assert tasks.score(CALC, response) == 1.0 and tasks.verify(CALC, response)


@pytest.mark.parametrize(
    "response",
    [
        "",
        "   ",
        "I don't know.",
        "one hundred sixty-nine",
        "75 + 94",  # restates the question: no answer
        "75 + 94 = 170",
        "170",
        "1690",
        "16.9",
        "-169",
        "169.5",
        "x169",
        "75 + 94 = 169 + 1 = 170",  # the last marked number counts
        "The answer is 170. No wait, 169 is wrong.",
        "169. Then add 3 more to get 172.",  # without a marker the last number counts
        "The numbers are 75 and 94.",
        "75 + 94 is 169 and 75 + 94 equals 170.",  # the last claim counts
    ],
)
def test_arithmetic_verifier_rejects_wrong_or_missing_answers(response):
    assert tasks.score(CALC, response) == 0.0 and not tasks.verify(CALC, response)


def test_arithmetic_verifier_other_operations_and_number_formats():
    def calc(expr):
        return f"Calculate {expr}. Reply with just the final number, nothing else."

    assert tasks.score(calc("1200 + 125"), "1,325") == 1.0
    assert tasks.score(calc("1200 + 125"), "The answer is 1,325.") == 1.0
    assert tasks.score(calc("1200 + 125"), "1,32") == 0.0
    assert tasks.score(calc("40 - 20"), "40 - 20") == 0.0  # the echoed 20 is not an answer
    assert tasks.score(calc("40 - 20"), "40 - 20 = 20") == 1.0
    assert tasks.score(calc("40 - 20"), "40-20 equals 20") == 1.0
    assert tasks.score(calc("57 - 57"), "0") == 1.0
    assert tasks.score(calc("12 * 11"), "12 x 11 = 132") == 1.0
    assert tasks.score(calc("12 * 11"), "12 * 11 = 121") == 0.0
    # A corruption is a nearby wrong number.
    task = tasks.make_task("arithmetic", ops="+-", min_value=0, max_value=20)
    rng = np.random.default_rng(0)
    for ex in tasks.generate_examples(task, 100, seed=1):
        bad = task.corrupt(ex["prompt"], ex["answer"], rng)
        assert int(bad) >= 0 and 1 <= abs(int(bad) - int(ex["answer"])) <= 10
        assert tasks.score(ex["prompt"], bad) == 0.0


def test_arithmetic_dispatch_through_the_module_function_judge():
    module, func = "jaxselm.data.tasks:score".split(":")
    judge = getattr(importlib.import_module(module), func)
    assert judge(CALC, "75 + 94 = 169") == 1.0
    assert judge(CALC, "75 + 94 = 159") == 0.0
    assert judge("\n" + CALC, "169") == 1.0  # leading whitespace does not hide the keyword
    assert isinstance(tasks.task_for_prompt(CALC), tasks.TASKS["arithmetic"])
    with pytest.raises(DataError, match="not an arithmetic prompt"):
        judge("Calculate the area of a circle.", "3")
    with pytest.raises(DataError, match="task keyword"):
        judge("calculate 75 + 94.", "169")  # the keyword is case-sensitive, like the others


def test_arithmetic_demonstrations_carry_messages():
    task = tasks.make_task("arithmetic")
    demos = tasks.make_demonstrations(task, 50, seed=2, corrupt_prob=0.5)
    assert demos == tasks.make_demonstrations(task, 50, seed=2, corrupt_prob=0.5)
    for d in demos:
        assert d["messages"] == [{"role": "user", "content": d["prompt"]}]
        assert (tasks.score(d["prompt"], d["response"]) == 1.0) != d["corrupted"]
    # The word-level tasks' demonstrations are unchanged (no messages).
    assert (
        "messages"
        not in tasks.make_demonstrations(tasks.make_task("sort"), 1, seed=0, corrupt_prob=0.0)[0]
    )
