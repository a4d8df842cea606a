"""Verifiable tasks: the tiny preset's synthetic arithmetic (generated in code), and MATH prompts
from a parquet file in verl's layout for the Qwen2.5-Math-7B preset."""

from __future__ import annotations

import random
import re

ALPHABET = "0123456789+=-*"
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


SPLITS = ("warm", "train", "heldout")


def split_of(a: int, b: int) -> str:
    """The fixed split of the problem ``a+b=``: every pair belongs to exactly one of the warm-start set
    (35 %), the RL training set (50 %) and the held-out set (15 %), whatever the seed, so a number
    reported as held-out comes from problems the model never saw, in supervised or RL training. The
    *unordered* pair is hashed (a multiplicative hash of min * 1000 + max; operands below 1000), so
    ``b+a=``, the same problem, lies in the same split; hashing the pair rather than its sum lets every
    split cover every sum range."""
    lo, hi = min(a, b), max(a, b)
    h = ((lo * 1000 + hi) * 2654435761) % 2**32 % 100
    return "heldout" if h < 15 else "warm" if h < 50 else "train"


def _pairs(split: str, max_operand: int, min_sum: int, max_sum: int | None):
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return [(a, b) for a in range(max_operand) for b in range(max_operand)
            if split_of(a, b) == split and a + b >= min_sum and (max_sum is None or a + b <= max_sum)]


def _row(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def arithmetic_problems(n: int, *, max_operand: int, seed: int, split: str, min_sum: int = 0,
                        max_sum: int | None = None):
    """``n`` problems ``a+b=`` drawn with replacement from one split (``split_of``), operands in
    [0, max_operand), answers within [min_sum, max_sum]."""
    pairs = _pairs(split, max_operand, min_sum, max_sum)
    if not pairs:
        raise ValueError(f"no {split} problem with operands < {max_operand} and sums in [{min_sum}, {max_sum}]")
    rng = random.Random(seed)
    return [_row(*rng.choice(pairs)) for _ in range(n)]


def heldout_problems(*, max_operand: int, limit: int | None = None, seed: int = 0, min_sum: int = 0,
                     max_sum: int | None = None):
    """The distinct held-out problems (each once), in a seeded order, the first ``limit`` of them."""
    pairs = _pairs("heldout", max_operand, min_sum, max_sum)
    random.Random(seed).shuffle(pairs)
    return [_row(*ab) for ab in pairs[:limit]]


def exact_answer_reward(prompts, completions, answer, **_):
    """1.0 if the completion (special tokens stripped) is exactly the answer, else 0.0."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def load_math_parquet(path: str, limit: int | None = None, log=print):
    """Math problems from a parquet file as ``{"prompt": [chat message], "answer": reference}`` rows with the
    recipe's user prompt: ``{question}`` + MATH_SUFFIX. Layouts read (``question_and_answer``): verl's
    (``prompt`` chat list or string, ``reward_model.ground_truth`` a string or the released files' dict with
    ``target``), ``problem`` + ``answer`` (AIME, AMC), ``problem`` + ``solution`` (MATH test: the last
    \\boxed{} of the solution). A ``path`` that is not a file is taken as a hub dataset name in one of these
    layouts (needs the network; not exercised by the tests).

    A row without a reference answer can never be rewarded (NGRPO would push every response to it down, as
    to an all-wrong group): it is left out, and the count reported. The released MATH train file has 4 rows
    whose ``target`` is empty: 2 get theirs from the solution's last \\boxed{} (``question_and_answer``), the
    other 2 box nothing and are left out."""
    import os

    import pandas as pd

    if os.path.exists(path):
        frame = pd.read_parquet(path)
    else:
        from datasets import load_dataset

        frame = load_dataset(path, split="train").to_pandas()
    rows, unanswered = [], 0
    for _, row in frame.iterrows():
        question, truth = question_and_answer(row)
        if not truth.strip():
            unanswered += 1
            continue
        rows.append({"prompt": [{"role": "user", "content": question + MATH_SUFFIX}], "answer": truth})
        if limit is not None and len(rows) >= limit:
            break
    if unanswered:
        log(f"{path}: left out {unanswered} problems without a reference answer")
    return rows


def _question_key(row) -> str:
    """A problem's question without case, whitespace, ``$`` or ``\\left``/``\\right``: the same problem in
    two files (MATH's train and test hold ``$y=x^2+bx+c$`` and ``$y = x^2 + bx + c$``, ``= 12.$`` and ``=12$.``)."""
    question = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    question = re.sub(r"\\(left|right)\b", "", question.removesuffix(MATH_SUFFIX))
    return re.sub(r"[\s$]", "", question).lower()


def without_seen(rows, seen) -> tuple[list, int]:
    """``rows`` less the problems that also occur in ``seen`` (e.g. a held-out set less what the training
    file holds: MATH's own train and test share problems), and how many were dropped. Rows as
    ``load_math_parquet`` returns them."""
    keys = {_question_key(r) for r in seen}
    kept = [r for r in rows if _question_key(r) not in keys]
    return kept, len(rows) - len(kept)


def question_and_answer(row) -> tuple[str, str]:
    """(question without any instruction suffix, reference answer) of one row in a layout load_math_parquet reads."""
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    else:
        question = row["problem"]
    if "reward_model" in row and row["reward_model"] is not None:
        truth = row["reward_model"]["ground_truth"]
        if isinstance(truth, dict):  # the released NGRPO files: {"question", "solution", "target"}
            # a few targets are empty where the solution boxes its answer: take the solution's
            truth = truth["target"] or boxed_answer(truth.get("solution") or "") or ""
    elif "answer" in row and row["answer"] is not None:
        truth = row["answer"]
    else:
        truth = boxed_answer(row["solution"])
        if truth is None:
            raise ValueError(f"no \\boxed{{}} answer in the solution of {question[:80]!r}")
    return _strip_suffix(question), str(truth).strip()  # one MATH train reference is wrapped in newlines


def _strip_suffix(question: str) -> str:
    # verl's MATH files may already carry an instruction; keep the question itself only once.
    return re.sub(r"\s*(Let's think step by step|Please reason step by step).*$", "", question, flags=re.S).strip()


def boxed_answer(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (balanced braces), or None. A later bare or unclosed
    ``\\boxed`` (a completion cut off mid-answer) does not hide an earlier complete one."""
    answer = None
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth = 0
        for j in range(match.end() - 1, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    answer = text[match.end():j]
                    break
    return answer


def math_verify_reward(prompts, completions, answer, **_):
    """The recipe's reward: 1 if the last \\boxed{} answer is mathematically equal to the reference.
    math-verify uses signal.alarm for its timeouts: call from the main thread (TRL does)."""
    from math_verify import parse, verify

    out = []
    for completion, truth in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        boxed = boxed_answer(text)
        if boxed is None:
            out.append(0.0)
            continue
        try:
            ok = verify(parse(f"${truth}$"), parse(f"$\\boxed{{{boxed}}}$"))
        except Exception:  # a malformed answer is a wrong answer
            ok = False
        out.append(1.0 if ok else 0.0)
    return out


def soft_overlong_penalty(max_length: int, cache: int):
    """DAPO's soft overlong punishment as a reward function: 0 up to ``max_length - cache`` tokens, then
    falling linearly to -1 at ``max_length`` (and -1 beyond)."""
    if not 0 < cache <= max_length:
        raise ValueError(f"need 0 < cache <= max_length, got cache={cache}, max_length={max_length}")

    def overlong_penalty(prompts, completions, completion_ids, **_):
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= max_length - cache:
                out.append(0.0)
            elif n <= max_length:
                out.append((max_length - cache - n) / cache)
            else:
                out.append(-1.0)
        return out

    return overlong_penalty
