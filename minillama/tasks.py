"""Multiple-choice tasks: a JSONL file of items, k-shot prompts, and accuracy from each choice's log-likelihood.

The scoring is lm-evaluation-harness's (EleutherAI, v0.4.13: `lm_eval/api/task.py`, `api/model.py`,
`api/samplers.py`, `models/huggingface.py`), so that `minillama eval --task` and `lm_eval --model minillama` give
the same numbers on the same items (tests/test_lm_eval.py):

- prompt: k solved examples `context + " " + answer + "\\n\\n"`, then the item's context; choice i is scored as
  the continuation `" " + choices[i]` (lm-eval's default target_delimiter and fewshot_delimiter).
- tokens: context and context+continuation are encoded whole (with BOS when the tokenizer has one) and the
  continuation's tokens are the tail of the whole beyond the context's length; whitespace that ends the context
  moves to the start of the continuation first (TemplateLM._encode_pair). An empty context is BOS alone.
- log-likelihood: the sum of the continuation tokens' log-probabilities; the model sees (context + continuation)
  minus its last token, cut from the left to the model's context length.
- acc: the choice with the largest log-likelihood is the gold one (ties go to the first, as numpy.argmax).
  acc_norm: the same after dividing each log-likelihood by the length of the choice in characters (Python `len`
  of the choice text, without the delimiter: lm-eval's `acc_norm`); acc_bytes divides by its UTF-8 bytes instead.
  Standard errors are the sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`).
- shots: one `random.Random(seed)` for the whole task, drawn item after item in file order; from the items marked
  `"split": "train"` when the file has any, else from the other items: k + 1 are drawn and the scored item is
  dropped (lm-eval's ContextSampler with fewshot_split equal to test_split). seed 1234 is lm-eval's default.

File format (docs/evaluation.md): one JSON object per line, {"context": str, "choices": [str, ...], "gold": int},
optionally "split" ("test", the default: scored; or "train": a few-shot example only) and "id" (str or int).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minillama.errors import MinillamaError

TARGET_DELIMITER = " "  # between a context and its answer (lm-eval's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # after each solved example (lm-eval's fewshot_delimiter)
DEFAULT_SEED = 1234  # lm-eval's fewshot_random_seed default (lm_eval/defaults.py DEFAULT_OTHER_SEED)
TASK_DIR = Path(__file__).resolve().parent / "task_data"  # the tasks shipped with the package
SPLITS = ("test", "train")
_FIELDS = {"context", "choices", "gold", "split", "id"}


# --------------------------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskItem:
    context: str
    choices: tuple[str, ...]
    gold: int
    split: str = "test"
    id: str | int | None = None
    line: int = field(default=0, compare=False)  # 1-based line in the task file, for messages


@dataclass
class Task:
    name: str
    path: Path
    items: list[TaskItem]  # scored, in file order
    train: list[TaskItem]  # few-shot examples only; empty when the file marks none


def shipped_tasks() -> list[str]:
    """Names of the task files that come with minillama (`--task NAME` finds them)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.jsonl"))


def resolve_task(name_or_path: str | Path) -> Path:
    """A task file's path: an existing file as given, else the shipped task of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and (TASK_DIR / f"{path.name}.jsonl").is_file():
        return TASK_DIR / f"{path.name}.jsonl"
    raise MinillamaError(f"task {str(name_or_path)!r}: no such file, and no shipped task of that name "
                         f"(shipped: {', '.join(shipped_tasks())})")


def load_task(name_or_path: str | Path) -> Task:
    """Read and check a JSONL task file; any bad line raises MinillamaError naming the file and line."""
    path = resolve_task(name_or_path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MinillamaError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    items = [_parse_item(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
    scored = [item for item in items if item.split == "test"]
    if not scored:
        raise MinillamaError(f"{path}: no items to score (every line is empty or marked \"split\": \"train\")")
    return Task(name=path.stem, path=path, items=scored, train=[item for item in items if item.split == "train"])


def _parse_item(line: str, path: Path, number: int) -> TaskItem:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MinillamaError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise MinillamaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise MinillamaError(f"{where}: unknown field {unknown[0]!r} (fields: context, choices, gold, split, id)")
    for key in ("context", "choices", "gold"):
        if key not in obj:
            raise MinillamaError(f"{where}: missing field {key!r}")
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str):
        raise MinillamaError(f"{where}: \"context\" must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise MinillamaError(f"{where}: \"choices\" must be a list of strings")
    if len(choices) < 2:
        raise MinillamaError(f"{where}: \"choices\" has {len(choices)} entries; a multiple-choice item needs >= 2")
    if any(c == "" for c in choices):
        # acc_norm divides by the choice's length; lm-eval would divide by zero.
        raise MinillamaError(f"{where}: choice {choices.index('')} is an empty string")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise MinillamaError(f"{where}: \"gold\" must be an integer index into \"choices\", got {gold!r}")
    if not 0 <= gold < len(choices):
        raise MinillamaError(f"{where}: \"gold\" is {gold} but \"choices\" has {len(choices)} entries "
                             f"(valid: 0..{len(choices) - 1})")
    split = obj.get("split", "test")
    if split not in SPLITS:
        raise MinillamaError(f"{where}: \"split\" must be \"test\" or \"train\", got {split!r}")
    item_id = obj.get("id")
    if item_id is not None and (isinstance(item_id, bool) or not isinstance(item_id, str | int)):
        raise MinillamaError(f"{where}: \"id\" must be a string or an integer, got {item_id!r}")
    return TaskItem(context, tuple(choices), gold, split, item_id, number)


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------
def check_shots(task: Task, shots: int) -> None:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise MinillamaError(f"shots must be a non-negative integer, got {shots!r}")
    if task.train and shots > len(task.train):
        raise MinillamaError(f"shots={shots} but {task.path} has {len(task.train)} \"train\" items to draw from")
    if not task.train and shots > len(task.items) - 1:
        raise MinillamaError(f"shots={shots} but {task.path} has {len(task.items)} items, so at most "
                             f"{len(task.items) - 1} other items to draw shots from (or mark some \"train\")")


def draw_shots(task: Task, shots: int, seed: int = DEFAULT_SEED, limit: int | None = None) -> list[list[TaskItem]]:
    """The solved examples shown before each of the first `limit` items, in lm-eval's order.

    One generator serves the whole task, so an item's examples depend on the items scored before it, exactly as in
    lm-eval's ContextSampler; `limit` keeps the same draws for the items it keeps.
    """
    check_shots(task, shots)
    items = task.items[:limit]
    if shots == 0:
        return [[] for _ in items]
    rnd = random.Random(seed)
    drawn = []
    for item in items:
        if task.train:
            drawn.append(rnd.sample(task.train, shots))
            continue
        # Draw one more than needed and drop the scored item (and any identical copy of it).
        sample = [x for x in rnd.sample(task.items, shots + 1) if x != item][:shots]
        if len(sample) < shots:  # an identical duplicate was drawn as well: draw again without copies
            sample = rnd.sample([x for x in task.items if x != item], shots)
        drawn.append(sample)
    return drawn


def prompt_context(item: TaskItem, shots: list[TaskItem]) -> str:
    """The text before each choice: the solved examples, then the item's context."""
    solved = "".join(s.context + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
    return solved + item.context


# --------------------------------------------------------------------------------------------------------------
# Log-likelihoods
# --------------------------------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval's TemplateLM does for a causal model.

    BOS starts the context when the tokenizer has one (our models are trained with BOS at each document's start);
    without it the end-of-text token conditions an empty context, as in lm-eval.
    """
    bos = tokenizer.bos_id is not None
    if context == "":
        continuation_ids = tokenizer.encode(continuation)
        prefix = tokenizer.bos_id if bos else tokenizer.eos_id
        if prefix is None:
            raise MinillamaError("an empty context needs a BOS or EOS token to condition on; the tokenizer has none")
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    # Trailing whitespace belongs to the continuation, so that " answer" tokenizes as it does in running text.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=bos)
    context_ids = tokenizer.encode(context, bos=bos)
    return context_ids, whole[len(context_ids):]


def _autocast(device: torch.device, dtype: str):
    from minillama.runtime import autocast_context

    return autocast_context(device, dtype)  # auto, bf16 or fp32; anything else is one line naming it


@torch.no_grad()
def score_continuations(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                        max_len: int | None = None, dtype: str = "bf16") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per (context ids,
    continuation ids) pair.

    Pairs are sorted longest first (ties by their tokens, so the batches depend only on the set of pairs) and run
    `batch_size` at a time, right-padded: with causal attention a padding token changes nothing before it.
    Inputs longer than `max_len` (default: the model's context) lose tokens from the left.
    """
    max_len = max_len or model.cfg.max_seq_len
    if batch_size < 1:
        raise MinillamaError(f"batch_size must be >= 1, got {batch_size}")
    for context, continuation in pairs:
        if not continuation:
            raise MinillamaError("a continuation encodes to no tokens (it merged into the context's last token)")
        if not context:
            raise MinillamaError("a context must hold at least one token (BOS for an empty text)")
        if len(continuation) > max_len:
            raise MinillamaError(f"a continuation of {len(continuation)} tokens exceeds the context of {max_len}")
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]),
                                                     tuple(pairs[i][0] + pairs[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(max_len + 1):][:-1] for i in batch]
            tokens = torch.zeros((len(batch), max(map(len, inputs))), dtype=torch.long)  # (B, T); 0 pads the right
            for row, ids in enumerate(inputs):
                tokens[row, :len(ids)] = torch.tensor(ids)
            with _autocast(device, dtype):
                logits = model(tokens.to(device))  # (B, T, V)
            for row, i in enumerate(batch):
                continuation = torch.tensor(pairs[i][1], device=device)
                end = len(inputs[row])
                # Position t predicts token t + 1: the continuation's logits are the last len(continuation) inputs.
                logprobs = logits[row, end - len(continuation):end].float().log_softmax(dim=-1)  # (C, V)
                token_logprobs = logprobs.gather(-1, continuation[:, None]).squeeze(-1)  # (C,)
                greedy = bool((logprobs.argmax(dim=-1) == continuation).all())
                results[i] = (float(token_logprobs.sum()), greedy)
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------------------
# Scoring a task
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    task: str
    path: str
    shots: int
    seed: int
    items: int
    acc: float
    acc_stderr: float | None  # None for a single item
    acc_norm: float
    acc_norm_stderr: float | None
    acc_bytes: float
    chance: float  # mean over items of 1 / len(choices): the expected acc of guessing
    counts: dict[str, int]  # correct, correct_norm, correct_bytes, items
    predictions: list[dict] = field(default_factory=list, repr=False)  # per item: line, pred, pred_norm, lls

    def to_dict(self, predictions: bool = False) -> dict:
        out = asdict(self)
        if not predictions:
            del out["predictions"]
        return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy.argmax


def _stderr(hits: list[int]) -> float | None:
    if len(hits) < 2:
        return None
    mean = sum(hits) / len(hits)
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (len(hits) - 1)) / math.sqrt(len(hits))


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MinillamaError(f"limit must be a positive integer, got {limit!r}")


def score_task(model: torch.nn.Module, tokenizer, task: str | Path | Task, shots: int = 0, seed: int = DEFAULT_SEED,
               limit: int | None = None, batch_size: int = 8, max_len: int | None = None,
               dtype: str = "bf16") -> TaskResult:
    """acc, acc_norm (and their standard errors) of `model` on a task file, its first `limit` items."""
    task = task if isinstance(task, Task) else load_task(task)
    _check_limit(limit)
    all_shots = draw_shots(task, shots, seed, limit)
    items = task.items[:limit]
    pairs, spans = [], []
    for item, examples in zip(items, all_shots):
        context = prompt_context(item, examples)
        spans.append((len(pairs), len(pairs) + len(item.choices)))
        for choice in item.choices:
            context_ids, continuation_ids = encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
            if not continuation_ids:
                raise MinillamaError(f"{task.path}:{item.line}: choice {choice!r} adds no token to the context")
            pairs.append((context_ids, continuation_ids))
    scores = score_continuations(model, pairs, batch_size, max_len, dtype)
    hits, hits_norm, hits_bytes, predictions = [], [], [], []
    for item, (first, last) in zip(items, spans):
        lls = [ll for ll, _ in scores[first:last]]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, item.choices)])
        pred_bytes = _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, item.choices)])
        hits.append(int(pred == item.gold))
        hits_norm.append(int(pred_norm == item.gold))
        hits_bytes.append(int(pred_bytes == item.gold))
        predictions.append(dict(line=item.line, id=item.id, gold=item.gold, pred=pred, pred_norm=pred_norm, lls=lls))
    n = len(items)
    return TaskResult(task=task.name, path=str(task.path), shots=shots, seed=seed, items=n, acc=sum(hits) / n,
                      acc_stderr=_stderr(hits), acc_norm=sum(hits_norm) / n, acc_norm_stderr=_stderr(hits_norm),
                      acc_bytes=sum(hits_bytes) / n, chance=sum(1 / len(item.choices) for item in items) / n,
                      counts=dict(correct=sum(hits), correct_norm=sum(hits_norm), correct_bytes=sum(hits_bytes),
                                  items=n),
                      predictions=predictions)


def evaluate_task_path(checkpoint: str | Path, task: str | Path, shots: int = 0, seed: int = DEFAULT_SEED,
                       limit: int | None = None, batch_size: int = 8, max_len: int | None = None,
                       dtype: str = "bf16") -> TaskResult:
    """`score_task` on a checkpoint directory. The task file and the shot count are checked before the model
    loads, so bad input fails at once."""
    from minillama.checkpoint import load

    loaded = load_task(task)
    check_shots(loaded, shots)
    _check_limit(limit)
    model, tokenizer = load(checkpoint)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files to encode the task with")
    if max_len is not None and not 1 <= max_len <= model.cfg.max_seq_len:
        raise MinillamaError(f"seq_len {max_len} must be in 1..{model.cfg.max_seq_len} (the model's context)")
    return score_task(model, tokenizer, loaded, shots, seed, limit, batch_size, max_len, dtype)
