"""What an attacker fine-tunes for: domain adaptation (perplexity) and generated skills (exact match).

Every task has training blocks and a score where higher is better:
* ``ppl`` tasks score ``-loss`` (negative mean next-token NLL, nats) on held-out text, so a gain is
  the drop in loss; the perplexity is reported beside it;
* ``exact`` tasks score exact-match accuracy of greedy completions on a held-out problem set;
* ``loglik`` tasks are an ``exact`` task scored by its answers' likelihood instead: ``-loss``, the
  negative mean NLL (nats) of the expected completion's tokens given the prompt (teacher-forced), on the
  same held-out problems. Same skill, same training data; a continuous score that moves with every
  step, where exact match stays at 0 until the greedy answer is right (a tiny model needs 100+ steps just
  to answer in the format). Name: the skill + ``-loglik`` (``recall-loglik``, ``addition-loglik``, a
  ``.jsonl`` task's path + ``-loglik``); ``demo --quick`` runs ``recall-loglik``.

Built-in tasks: ``prose`` (adapt to builtin:prose), ``tests`` (adapt to the stdlib test suites),
``addition`` (``a+b=`` with up to 3 digits), ``reverse`` (reverse a 3–6 letter string), ``recall``
(in-context recall: ``k=3 q=7; q?`` → ``7``, two key–value pairs). Skill problems
are generated from a seed and split by a hash of the prompt, so train and test never share a problem.
A ``.jsonl`` file with ``prompt``/``completion`` (exact match) or ``text`` (perplexity) fields is a
user task.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import WeightlockError
from ..registry import Registry


@dataclass
class Task:
    """A fine-tuning target: texts to train on and a test, ``ppl`` (held-out perplexity; score = −loss),
    ``exact`` (exact-match accuracy on prompt → completion pairs; score = accuracy) or ``loglik`` (the same
    pairs; score = −mean NLL of the completions' tokens). Higher is better."""

    name: str
    kind: str  # "ppl" | "exact" | "loglik"
    train_texts: Callable[[], list[str]]
    test_texts: Callable[[], list[str]] | None = None  # ppl tasks
    test_pairs: Callable[[], list[tuple[str, str]]] | None = None  # exact and loglik tasks

    def train_blocks(self, tokenizer, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
        """The training texts packed into token blocks (at most ``max_tokens``)."""
        from ..data.packing import pack_texts

        blocks = pack_texts(self.train_texts(), tokenizer, block_size, max_tokens)
        if blocks.shape[0] == 0:
            raise WeightlockError(f"task {self.name}: too little training text for one block of {block_size}")
        return blocks

    def evaluate(self, model, tokenizer, block_size: int = 128, max_tokens: int = 16384,
                 max_examples: int = 200) -> dict:
        """Score ``model`` on the task's test data: ``score`` plus the loss and perplexity (``ppl``), the
        accuracy (``exact``) or the completions' mean NLL (``loglik``), and the number of examples."""
        if self.kind == "ppl":
            from ..data.packing import pack_texts
            from ..train.loop import evaluate_loss

            blocks = pack_texts(self.test_texts(), tokenizer, block_size, max_tokens)
            loss = evaluate_loss(model, blocks)
            return {"score": -loss, "loss": loss, "perplexity": math.exp(loss), "tokens": int(blocks.numel())}
        pairs = self.test_pairs()[:max_examples]
        if self.kind == "loglik":
            loss = completion_loss(model, tokenizer, pairs)
            return {"score": -loss, "loss": loss, "examples": len(pairs)}
        acc = exact_match(model, tokenizer, pairs)
        return {"score": acc, "accuracy": acc, "examples": len(pairs)}


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], batch: int = 32) -> float:
    """Fraction of prompts whose greedy continuation starts with the expected completion.

    Prompts are grouped by token length, so each batch is generated together without padding (the
    result is the same as one prompt at a time)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    groups: dict[tuple[int, int], list[tuple[list[int], str]]] = {}
    for prompt, answer in pairs:
        ids = [eos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n_new = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
        groups.setdefault((len(ids), n_new), []).append((ids, answer))
    hits = 0
    for (_, n_new), items in groups.items():
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            ids = torch.tensor([c[0] for c in chunk], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or eos)
            for row, (_, answer) in zip(out[:, ids.shape[1]:], chunk):
                hits += tokenizer.decode(row, skip_special_tokens=True).startswith(answer)
    model.train(was)
    return hits / max(1, len(pairs))


@torch.no_grad()
def completion_loss(model, tokenizer, pairs: list[tuple[str, str]], batch: int = 32) -> float:
    """Mean NLL (nats per token) of each expected completion's tokens given its prompt, teacher-forced,
    over every completion token of ``pairs``; the prompt is encoded as :func:`exact_match` does (EOS first)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    groups: dict[tuple[int, int], list[list[int]]] = {}
    for prompt, answer in pairs:
        ids = [eos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
        groups.setdefault((len(ids), len(ans)), []).append(ids + ans)
    total, tokens = 0.0, 0
    for (n_prompt, n_ans), rows in groups.items():
        for i in range(0, len(rows), batch):
            ids = torch.tensor(rows[i:i + batch], device=device)
            logits = model(ids, attention_mask=torch.ones_like(ids)).logits[:, n_prompt - 1:-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ids[:, n_prompt:].reshape(-1), reduction="sum").item()
            tokens += ids.shape[0] * n_ans
    model.train(was)
    return total / max(1, tokens)


def _hash_split(prompt: str) -> str:
    return "test" if hashlib.sha256(prompt.encode()).digest()[0] < 26 else "train"  # ~10% test


def _skill(make: Callable[[random.Random], tuple[str, str]], n: int = 20000, seed: int = 1234):
    def pairs(split: str) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        seen, out = set(), []
        for _ in range(n):
            p, a = make(rng)
            if p in seen:
                continue
            seen.add(p)
            if _hash_split(p) == split:
                out.append((p, a))
        return out

    return pairs


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a}+{b}=", f"{a + b}\n"


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    return f"reverse {s}:", f" {s[::-1]}\n"


def _recall(rng: random.Random) -> tuple[str, str]:
    # two pairs: the small model learns this within ~150 steps (0 → ~0.5 exact match); with four pairs its
    # accuracy stayed at chance (~0.1, a digit) and the gains were seed noise
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
    vals = [str(rng.randint(0, 9)) for _ in keys]
    q = rng.randrange(2)
    return " ".join(f"{k}={v}" for k, v in zip(keys, vals)) + f"; {keys[q]}?", f" {vals[q]}\n"


def _skill_task(name: str, make) -> Task:
    pairs = _skill(make)
    return Task(name, "exact", train_texts=lambda: ["".join(p + a for p, a in pairs("train"))],
                test_pairs=lambda: pairs("test"))


def _domain_task(name: str, spec: str) -> Task:
    from ..data import load_texts

    return Task(name, "ppl", train_texts=lambda: load_texts(spec, "train"),
                test_texts=lambda: load_texts(spec, "test"))


# task factories (zero-argument callables returning a Task); third-party tasks register through the
# entry-point group ``weightlock.tasks`` or with ``@TASKS.register("name")`` on a factory
TASKS: Registry[Callable[[], Task]] = Registry("task", Callable, group="weightlock.tasks", instances=True)
TASKS.register("prose", lambda: _domain_task("prose", "builtin:prose"))
TASKS.register("tests", lambda: _domain_task("tests", "builtin:tests"))
TASKS.register("addition", lambda: _skill_task("addition", _addition))
TASKS.register("reverse", lambda: _skill_task("reverse", _reverse))
TASKS.register("recall", lambda: _skill_task("recall", _recall))  # in-context key–value recall


LOGLIK = "-loglik"  # a prompt/completion task + this suffix: scored by its completions' likelihood


def get_task(name: str) -> Task:
    """A built-in task by name, or a user task from a ``.jsonl`` path; either + ``-loglik``: that
    prompt/completion task scored by its completions' mean NLL (kind ``loglik``) instead of exact match."""
    if name in TASKS:
        task = TASKS[name]()
        if not isinstance(task, Task):
            raise WeightlockError(f"task {name!r}: its factory returned {type(task).__name__}, not a Task")
        return task
    if name.endswith(LOGLIK) and len(name) > len(LOGLIK):
        base = get_task(name[:-len(LOGLIK)])
        if base.kind != "exact":
            raise WeightlockError(f"task {name!r}: {LOGLIK} scores a prompt/completion task; "
                                  f"{base.name!r} is a {base.kind} task")
        return replace(base, name=name, kind="loglik")
    p = Path(name)
    if p.suffix == ".jsonl":
        return _jsonl_task(p)
    raise WeightlockError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} or give a .jsonl file "
                          f"(a skill or .jsonl task + {LOGLIK!r}: scored by its answers' likelihood)")


def _jsonl_task(path: Path) -> Task:
    if not path.exists():
        raise WeightlockError(f"{path}: task file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightlockError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise WeightlockError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise WeightlockError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            for k in ("prompt", "completion", "text"):
                if k in row and not isinstance(row[k], str):
                    raise WeightlockError(f"{path}:{i}: field {k!r} must be a string, got {json.dumps(row[k])}")
            rows.append(row)
    if not rows:
        raise WeightlockError(f"{path}: no examples")
    if all("prompt" in r and "completion" in r for r in rows):
        train = [r for r in rows if _hash_split(r["prompt"]) == "train"]
        test = [(r["prompt"], r["completion"]) for r in rows if _hash_split(r["prompt"]) == "test"]
        if not test or not train:
            raise WeightlockError(f"{path}: too few examples to hold some out for testing")
        return Task(path.stem, "exact",
                    train_texts=lambda: ["".join(r["prompt"] + r["completion"] + "\n" for r in train)],
                    test_pairs=lambda: test)
    if all(isinstance(r.get("text"), str) for r in rows):
        spec = str(path)
        from ..data import load_texts

        return Task(path.stem, "ppl", train_texts=lambda: load_texts(spec, "train"),
                    test_texts=lambda: load_texts(spec, "test"))
    raise WeightlockError(f"{path}: every line needs prompt+completion fields, or a text field")
