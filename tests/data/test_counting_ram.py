"""The counting task against RAM's generator (facebookresearch/RAM, projects/cope/scripts/
count_data_gen.py), and Flip-Flop's loss on every read.

``_ram_sample`` below is RAM's generator restated line by line with its own ``random`` calls
(only the text format differs: the task keyword first, the answer taken from the simulated
state). Our generator draws from numpy, so the two cannot agree sample by sample; they are
compared as distributions over 3000 programs each, with tolerances of about 4 standard errors.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from jaxselm.data import tasks
from jaxselm.data.packing import pack_sequences

MAX_VAL = 10
WEIGHTS = {"set": 1, "pass": 50, "inc": 7}  # RAM's OP_WEIGHTS (SET, DUMMY, INCREMENT)


class _Fail(Exception):
    pass


def _ram_sample(r: random.Random, nvars: int, max_steps: int) -> tuple[list[str], str]:
    """RAM's try_generate_sample / generate_sample: (statements, printed variable)."""
    names = "abcdefghjkmnpqrsuvwxyz"[:nvars]  # ours skips i, l, o, t (vocabulary clashes)
    for _ in range(1000):
        try:
            state: dict[str, int] = {}
            stmts = []
            for _ in range(r.randint(3, max_steps)):
                for _trial in range(100):
                    op = r.choices(list(WEIGHTS), list(WEIGHTS.values()), k=1)[0]
                    try:
                        if op == "set":
                            var = r.choice(names)
                            state[var] = 0
                            stmts.append(f"{var} = 0 ;")
                        elif op == "pass":
                            stmts.append("pass;")
                        else:
                            if not state:
                                raise _Fail
                            var = r.choice(list(state))
                            if state[var] + 1 > MAX_VAL:
                                raise _Fail
                            state[var] += 1
                            stmts.append(f"{var} ++;")
                        break
                    except _Fail:
                        continue
                else:
                    raise ValueError("Failed to generate too many times!")
            if not state:
                raise _Fail
            return stmts, r.choice(list(state))
        except _Fail:
            continue
    raise ValueError("Failed to generate too many times!")


def _stats(programs: list[tuple[list[str], str]]) -> dict[str, float]:
    ops = Counter()
    answers = []
    lengths = []
    for stmts, var in programs:
        lengths.append(len(stmts))
        for s in stmts:
            ops["set" if s.endswith("= 0 ;") else "inc" if s.endswith("++;") else "pass"] += 1
        ans = tasks.make_task("count").reference(
            " ".join(["count", *stmts, "print", var])
        )  # our verifier on RAM's programs
        answers.append(int(ans))
    n = sum(ops.values())
    return {
        "len": float(np.mean(lengths)),
        "set": ops["set"] / n,
        "inc": ops["inc"] / n,
        "ans": float(np.mean(answers)),
        "ans0": float(np.mean(np.asarray(answers) == 0)),
        "ans10": float(np.mean(np.asarray(answers) == 10)),
    }


def _ours(task, n: int) -> list[tuple[list[str], str]]:
    out = []
    for ex in tasks.generate_examples(task, n, seed=0):
        words = ex["prompt"].split()[1:]
        assert words[-2] == "print"
        stmts, cur = [], []
        for w in words[:-2]:
            cur.append(w)
            if w in (";", "++;", "pass;"):
                stmts.append(" ".join(cur))
                cur = []
        assert not cur
        out.append((stmts, words[-1]))
    return out


def test_counting_programs_follow_rams_grammar_and_state():
    task = tasks.make_task("count", num_vars=3, min_ops=3, max_ops=64)
    for stmts, var in _ours(task, 300):
        assert 3 <= len(stmts) <= 64
        state: dict[str, int] = {}
        for s in stmts:
            w = s.split()
            if w == ["pass;"]:
                continue
            if w[1:] == ["=", "0", ";"]:
                state[w[0]] = 0
            else:
                assert w[1] == "++;" and w[0] in state  # only a variable that has been set
                state[w[0]] += 1
                assert state[w[0]] <= MAX_VAL
        assert var in state


@pytest.mark.parametrize("max_ops", [16, 128])
def test_counting_distribution_matches_rams_generator(max_ops):
    n = 3000
    ram = _stats([_ram_sample(random.Random(i), 3, max_ops) for i in range(n)])
    ours = _stats(_ours(tasks.make_task("count", num_vars=3, min_ops=3, max_ops=max_ops), n))
    # 4 standard errors of a mean over 3000 programs: lengths are ~uniform on [3, max_ops] (the
    # redraws of programs without a set favour long ones), op shares are proportions over the
    # >= 30k statements, answers lie in [0, 10].
    len_se = max_ops / np.sqrt(12 * n)
    assert abs(ours["len"] - ram["len"]) < 4 * len_se + 0.5, (ours, ram)
    statements = n * ram["len"]
    for op in ("set", "inc"):  # pass weight 40 instead of 50 moves inc by > 10 se here
        se = np.sqrt(ram[op] * (1 - ram[op]) / statements)
        assert abs(ours[op] - ram[op]) < 4 * se, (op, ours, ram)
    assert abs(ours["ans"] - ram["ans"]) < 4 * 3.5 / np.sqrt(n), (ours, ram)
    for k in ("ans0", "ans10"):
        se = np.sqrt(max(ram[k], 0.01) * (1 - ram[k]) / n)
        assert abs(ours[k] - ram[k]) < 4 * se, (k, ours, ram)


def test_counting_saturates_at_ten_like_ram():
    """With long programs and one variable, increments past 10 are redrawn (RAM's
    GenerationFail), so answers pile up at 10 but never exceed it."""
    task = tasks.make_task("count", num_vars=1, min_ops=400, max_ops=400)
    answers = [int(ex["answer"]) for ex in tasks.generate_examples(task, 50, seed=1)]
    assert max(answers) == 10 and min(answers) >= 0


def test_flipflop_loss_on_every_read():
    task = tasks.make_task("flipflop", length=64, p_ignore=0.6, loss_on_reads=True)
    tok = task.tokenizer()
    for d in tasks.make_demonstrations(task, 20, seed=0, corrupt_prob=0.0):
        words = d["prompt"].split()
        idx = d["prompt_loss_words"]
        assert idx and all(words[i - 1] == "r" and words[i] in ("0", "1") for i in idx)
        # every inner read, and nothing else: the final "r" has no bit in the prompt
        assert len(idx) == sum(w == "r" for w in words[1:-1:2]) == words[1:-1:2].count("r")
        # the bit of each inner read is the last written bit (what the model must predict)
        for i in idx:
            writes = [words[j + 1] for j in range(1, i - 1, 2) if words[j] == "w"]
            assert words[i] == writes[-1]
        ids = tok.encode(d["prompt"])
        seqs = pack_sequences(
            [ids], [tok.encode(d["response"])], tok.pad_id, prompt_loss=[idx]
        )  # word i is token i with the word tokenizer (no BOS)
        mask = np.asarray(seqs.loss_mask[0])
        assert mask.sum() == len(idx) + len(tok.encode(d["response"]))
        assert all(mask[i] for i in idx)
    plain = tasks.make_task("flipflop", length=64, p_ignore=0.6)
    assert "prompt_loss_words" not in tasks.make_demonstrations(plain, 1, seed=0, corrupt_prob=0)[0]
