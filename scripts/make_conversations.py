"""Write a synthetic conversation set (JSONL, the chat format of ``deepseek-moe finetune``).

Small tasks a small model can learn and a reader can check: addition, comparison, reversing and
counting letters of words, each asked in a few phrasings, some with a system line, some with a
follow-up turn. The same ``--seed`` gives the same file on every machine (no data is read).

    python scripts/make_conversations.py conversations.jsonl --n 2000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

WORDS = ("apple river stone cloud garden mirror candle forest pepper silver window rabbit lemon "
         "castle harbor pencil thunder meadow violin copper island jacket marble orange planet "
         "saddle tiger velvet wagon yellow basket dragon ember falcon glacier hollow ivory jungle").split()
SYSTEMS = ("Answer briefly.", "You are a careful assistant.", "Reply in one sentence.")


def _add(r: random.Random) -> list[dict]:
    a, b = r.randint(1, 99), r.randint(1, 99)
    ask = r.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?"]).format(a=a, b=b)
    msgs = [{"role": "user", "content": ask}, {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    if r.random() < 0.3:
        c = r.randint(1, 9)
        msgs += [{"role": "user", "content": f"And if you add {c} more?"},
                 {"role": "assistant", "content": f"Then it is {a + b + c}."}]
    return msgs


def _compare(r: random.Random) -> list[dict]:
    a, b = r.sample(range(1, 100), 2)
    ask = r.choice(["Which is larger, {a} or {b}?", "Is {a} bigger than {b}?"]).format(a=a, b=b)
    hi, lo = max(a, b), min(a, b)
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": f"{hi} is larger than {lo}."}]


def _reverse(r: random.Random) -> list[dict]:
    w = r.choice(WORDS)
    ask = r.choice(["Spell '{w}' backwards.", "Reverse the word '{w}'."]).format(w=w)
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": f"'{w}' backwards is '{w[::-1]}'."}]


def _letters(r: random.Random) -> list[dict]:
    w = r.choice(WORDS)
    ask = r.choice(["How many letters are in '{w}'?", "Count the letters of '{w}'."]).format(w=w)
    msgs = [{"role": "user", "content": ask}, {"role": "assistant", "content": f"'{w}' has {len(w)} letters."}]
    if r.random() < 0.3:
        msgs += [{"role": "user", "content": "What is its first letter?"},
                 {"role": "assistant", "content": f"Its first letter is '{w[0]}'."}]
    return msgs


TASKS = (_add, _compare, _reverse, _letters)


def conversations(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = r.choice(TASKS)(r)
        if r.random() < 0.25:
            msgs = [{"role": "system", "content": r.choice(SYSTEMS)}] + msgs
        out.append({"messages": msgs})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the JSONL file to write")
    p.add_argument("--n", type=int, default=2000, help="conversations (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not a.force:
        print(f"error: {out} exists (--force replaces it)", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(c) + "\n" for c in conversations(a.n, a.seed)))
    os.replace(tmp, out)
    print(f"{a.n} conversations -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
