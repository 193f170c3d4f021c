"""Capability beyond perplexity, with lm-evaluation-harness as the engine, on local tasks only.

``lm_eval`` (optional dependency: ``pip install lm_eval``) runs the in-memory model through its ``HFLM``
wrapper. The task files are generated here from the built-in corpus's *test* split (never seen by
pretraining, calibration or attacks) and written as JSONL data + lm-eval YAML configs into a directory,
so nothing comes from a hub:

* ``wl_code_next_line`` (multiple choice): 6 lines of a held-out Python file, then the true next line
  against 3 lines taken from other held-out files (accuracy, chance 0.25);
* ``wl_prose_next_sentence`` (multiple choice): the same with sentences of held-out prose;
* ``wl_recall`` (generation): the built-in key–value recall problems, greedy completion until a newline,
  exact match.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from ..errors import WeightlockError

TASKS = ("wl_code_next_line", "wl_prose_next_sentence", "wl_recall")

_MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 16
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(\\\\S+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
metadata:
  version: 1.0
"""


def _mc_docs(units: list[list[str]], seed: int, n: int, context: int) -> list[dict]:
    """Questions from documents split into units (lines, sentences): ``context`` units, then the true next
    unit against 3 units from other documents (each choice starts with the delimiter the unit needs)."""
    rng = random.Random(seed)
    pool = [(i, u) for i, doc in enumerate(units) for u in doc[context:] if len(u.strip()) > 8]
    cands = [(i, k) for i, doc in enumerate(units) for k in range(context, len(doc)) if len(doc[k].strip()) > 8]
    rng.shuffle(cands)
    docs = []
    for i, k in cands:
        ctx = "".join(units[i][k - context:k])
        if len(ctx.strip()) < 40:
            continue
        wrong = []
        while len(wrong) < 3:
            j, u = pool[rng.randrange(len(pool))]
            if j != i and u not in wrong and u != units[i][k]:
                wrong.append(u)
        choices = [units[i][k], *wrong]
        rng.shuffle(choices)
        docs.append({"context": ctx, "choices": choices, "label": choices.index(units[i][k])})
        if len(docs) == n:
            break
    return docs


def write_tasks(out: str | os.PathLike, n: int = 200, seed: int = 0) -> Path:
    """Generate the local tasks (``n`` examples each) from the built-in corpus's test split into ``out``
    (JSONL data + lm-eval YAML configs); returns ``out``, the ``include_path`` for lm-eval."""
    from ..data import load_texts
    from ..io import write_json, write_text
    from .tasks import get_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    code = [[ln + "\n" for ln in t.split("\n")] for t in load_texts("builtin:code", "test")]
    prose = [re.split(r"(?<=[.!?] )", " ".join(t.split())) for t in load_texts("builtin:prose", "test")]
    prose = [[s for s in doc if s] for doc in prose]
    data = {
        "wl_code_next_line": _mc_docs(code, seed, n, 6),
        "wl_prose_next_sentence": _mc_docs(prose, seed + 1, n, 3),
        "wl_recall": [{"prompt": p, "completion": c.strip()} for p, c in get_task("recall").test_pairs()[:n]],
    }
    for name, docs in data.items():
        if len(docs) < min(n, 20):
            raise WeightlockError(f"{name}: only {len(docs)} examples could be built from the corpus")
        f = out / f"{name}.jsonl"
        write_text(f, "".join(json.dumps(d) + "\n" for d in docs))
        template = _GEN_YAML if name == "wl_recall" else _MC_YAML
        write_text(out / f"{name}.yaml", template.format(name=name, data=f.resolve()))
    write_json(out / "tasks.json", {"tasks": list(data), "examples": {k: len(v) for k, v in data.items()},
                                    "seed": seed, "source": "builtin corpus, test split"})
    return out


def evaluate_harness(model, tokenizer, tasks: list[str] | tuple[str, ...] = TASKS, task_dir=None,
                     limit: int | None = None, batch_size: int = 8) -> dict:
    """Run lm-evaluation-harness on ``model`` (in memory, through ``HFLM``) for local ``tasks``;
    returns ``{task: {metric: value, ...}}`` plus the per-task sample counts."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise WeightlockError("lm-evaluation-harness is not installed: pip install lm_eval") from None
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    unknown = [t for t in tasks if t not in TASKS and task_dir is None]
    if unknown:
        raise WeightlockError(f"unknown task(s) {', '.join(unknown)}; local tasks: {', '.join(TASKS)}")
    with tempfile.TemporaryDirectory(prefix="wl-harness-") as tmp:
        include = Path(task_dir) if task_dir is not None else write_tasks(tmp)
        tm = TaskManager(include_path=str(include), include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                      log_samples=False, bootstrap_iters=0)
    out = {}
    for name in tasks:
        r = res["results"][name]
        out[name] = {k.split(",")[0]: float(v) for k, v in r.items()
                     if "," in k and "stderr" not in k and isinstance(v, (int, float))}
        out[name]["samples"] = int(res.get("n-samples", {}).get(name, {}).get("effective", 0))
    return out
