"""Multiple-choice scoring (minillama/tasks.py): acc and acc_norm worked out by hand, tokenization, truncation,
batching, deterministic shots, the shipped task files, and bad input through the CLI."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from minillama.cli import main
from minillama.errors import MinillamaError
from minillama.tasks import (
    FEWSHOT_DELIMITER,
    TASK_DIR,
    Task,
    TaskItem,
    draw_shots,
    encode_pair,
    load_task,
    prompt_context,
    score_continuations,
    score_task,
    shipped_tasks,
)
from minillama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------------------
# A model whose next-token probabilities are a table we write down, over a character vocabulary
# --------------------------------------------------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """One id per character; "<s>" is 0 and "</s>" is 1."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.bos_id, self.eos_id = 0, 1

    def _encode(self, text):
        return [2 + self.alphabet.index(c) for c in text]

    def encode_batch(self, texts):
        return [self._encode(t) for t in texts]

    def _decode(self, ids):
        return "".join(self.alphabet[i - 2] for i in ids if i >= 2)

    @property
    def vocab_size(self):
        return 2 + len(self.alphabet)

    def token_to_id(self, token):
        return None

    def save(self, directory):
        raise NotImplementedError

    def _defining_bytes(self):
        return self.alphabet.encode()


class TableModel(torch.nn.Module):
    """logits[t] = log P(next | token t): a bigram model whose log-softmax is exactly the table's log."""

    def __init__(self, tokenizer: CharTokenizer, probabilities: dict[str, dict[str, float]], max_seq_len: int = 64):
        super().__init__()
        V = tokenizer.vocab_size
        table = torch.zeros(V, V, dtype=torch.float64)
        symbols = {2 + i: c for i, c in enumerate(tokenizer.alphabet)}
        for current in range(V):
            row = probabilities.get(symbols.get(current), {})
            given = {tokenizer.encode(c)[0]: p for c, p in row.items()}
            rest = (1.0 - sum(given.values())) / (V - len(given))  # the remaining mass spread evenly
            table[current] = rest
            for token, p in given.items():
                table[current, token] = p
        self.log_table = torch.nn.Parameter(table.log().float(), requires_grad=False)
        self.cfg = type("Cfg", (), {"max_seq_len": max_seq_len})()

    def forward(self, tokens):
        return self.log_table[tokens]  # (B, T, V)


PROBABILITIES = {"x": {" ": 0.5}, " ": {"a": 0.3, "b": 0.2, "c": 0.1}, "b": {"b": 0.9}, "c": {"c": 0.5}}


def write_task(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def test_acc_and_acc_norm_worked_out_by_hand(tmp_path):
    tokenizer = CharTokenizer("xabc ")
    model = TableModel(tokenizer, PROBABILITIES)
    task = write_task(tmp_path / "t.jsonl", [
        {"context": "x", "choices": ["a", "bb"], "gold": 1},
        {"context": "x", "choices": ["ccc", "a"], "gold": 1},
        {"context": "x", "choices": ["a", "c"], "gold": 0},
    ])
    result = score_task(model, tokenizer, task, dtype="fp32")
    ln = math.log
    # Each continuation is " " + choice; the model reads "<s>x " + choice[:-1].
    a = ln(0.5) + ln(0.3)
    bb = ln(0.5) + ln(0.2) + ln(0.9)
    ccc = ln(0.5) + ln(0.1) + ln(0.5) + ln(0.5)
    c = ln(0.5) + ln(0.1)
    expected_lls = [[a, bb], [ccc, a], [a, c]]
    for prediction, lls in zip(result.predictions, expected_lls):
        assert prediction["lls"] == pytest.approx(lls, abs=1e-5)
    # Item 1: "a" has the larger sum (-1.90 > -2.41) but "bb" the larger sum per character (-1.20 > -1.90).
    # Item 2: "a" wins on the sum (-1.90 > -4.38), "ccc" per character (-1.46 > -1.90).  Item 3: "a" both ways.
    assert [p["pred"] for p in result.predictions] == [0, 1, 0]
    assert [p["pred_norm"] for p in result.predictions] == [1, 0, 0]
    assert result.acc == pytest.approx(2 / 3) and result.acc_norm == pytest.approx(2 / 3)
    assert result.counts == dict(correct=2, correct_norm=2, correct_bytes=2, items=3)
    # Sample standard deviation of [0, 1, 1] is sqrt(1/3); over sqrt(3) items that is 1/3.
    assert result.acc_stderr == pytest.approx(1 / 3)
    assert result.chance == pytest.approx(0.5)


def test_acc_norm_counts_characters_and_acc_bytes_utf8_bytes(tmp_path):
    # "xx" is 2 characters and 2 bytes, "é" 1 character and 2 bytes.
    tokenizer = CharTokenizer("xé ")
    model = TableModel(tokenizer, {"x": {" ": 0.5, "x": 0.3}, " ": {"x": 0.3, "é": 0.2}})
    task = write_task(tmp_path / "t.jsonl", [{"context": "x", "choices": ["xx", "é"], "gold": 0}])
    result = score_task(model, tokenizer, task, dtype="fp32")
    xx = math.log(0.5) + math.log(0.3) + math.log(0.3)  # -3.10
    e = math.log(0.5) + math.log(0.2)  # -2.30
    assert result.predictions[0]["lls"] == pytest.approx([xx, e], abs=1e-5)
    assert e > xx  # acc: "é"
    assert xx / 2 > e / 1  # acc_norm, per character: "xx" (-1.55 > -2.30)
    assert e / 2 > xx / 2  # acc_bytes, per byte: "é" again
    assert (result.acc, result.acc_norm, result.acc_bytes) == (0.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------------------------
# Tokenization, truncation, batching
# --------------------------------------------------------------------------------------------------------------
class MergingTokenizer(CharTokenizer):
    """Characters plus multi-character tokens, matched longest first: encoding a text whole can differ from
    encoding its parts."""

    def __init__(self, alphabet: str, merges: list[str]):
        super().__init__(alphabet)
        self.merges = sorted(merges, key=len, reverse=True)

    def _encode(self, text):
        ids, i = [], 0
        while i < len(text):
            merge = next((m for m in self.merges if text.startswith(m, i)), None)
            if merge is not None:
                ids.append(2 + len(self.alphabet) + self.merges.index(merge))
                i += len(merge)
            else:
                ids.append(2 + self.alphabet.index(text[i]))
                i += 1
        return ids

    @property
    def vocab_size(self):
        return 2 + len(self.alphabet) + len(self.merges)


def test_encode_pair_splits_the_whole_encoding_as_lm_eval():
    tok = MergingTokenizer("xab ", ["a b", "ab"])
    x, a, space, a_b, ab = 2, 3, 5, 6, 7
    # Trailing whitespace moves into the continuation.
    assert encode_pair(tok, "x ", "a") == ([0, x], [space, a])
    # The continuation is the whole encoding beyond the context's length, even when a token straddles the cut.
    assert encode_pair(tok, "xa", "bx") == ([0, x, a], [x])  # whole: <s> x ab x
    assert encode_pair(tok, "xa", " b") == ([0, x, a], [])  # whole: <s> x "a b": nothing is left
    # An empty context is BOS alone.
    assert encode_pair(tok, "", " ab") == ([0], [space, ab])
    assert a_b == 6


def test_a_choice_swallowed_by_the_context_is_refused(tmp_path):
    tok = MergingTokenizer("xab ", ["a b"])
    model = TableModel(tok, {})
    fine = write_task(tmp_path / "fine.jsonl", [{"context": "xb", "choices": ["b", "x"], "gold": 0}])
    assert score_task(model, tok, fine).items == 1
    swallowed = write_task(tmp_path / "t.jsonl", [{"context": "xa", "choices": ["b", "x"], "gold": 0}])
    with pytest.raises(MinillamaError, match=r"t.jsonl:1: choice 'b' adds no token to the context"):
        score_task(model, tok, swallowed)


def test_long_inputs_lose_tokens_from_the_left(tiny_model):
    model, _ = tiny_model
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(3, 300, (40,), generator=generator).tolist()
    continuation = [5, 6, 7]
    max_len = 16
    # The model sees the last max_len tokens of context + continuation (less the final one): the context's last 14.
    kept = context[-(max_len + 1 - len(continuation)):]
    long, short = score_continuations(model, [(context, continuation), (kept, continuation)], max_len=max_len,
                                      dtype="fp32")
    assert long[0] == pytest.approx(short[0], abs=1e-5)
    full = score_continuations(model, [(context, continuation)], dtype="fp32")[0]
    assert abs(full[0] - long[0]) > 1e-4  # the truncation did change what the model saw


def test_batching_and_padding_do_not_change_scores(tiny_model):
    model, _ = tiny_model
    generator = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(3, 300, (n,), generator=generator).tolist(), [7 + n, 8])
             for n in (1, 5, 12, 3, 30, 8, 2)]
    one_at_a_time = score_continuations(model, pairs, batch_size=1, dtype="fp32")
    batched = score_continuations(model, pairs, batch_size=4, dtype="fp32")
    for (single, _), (together, _) in zip(one_at_a_time, batched):
        assert together == pytest.approx(single, abs=1e-4)  # and in the caller's order, though run sorted


# --------------------------------------------------------------------------------------------------------------
# Shots
# --------------------------------------------------------------------------------------------------------------
def _items(n: int, split: str = "test") -> list[dict]:
    return [{"context": f"{split} question {i}", "choices": [f"yes {i}", f"no {i}"], "gold": i % 2, "split": split}
            for i in range(n)]


def test_shots_are_seeded_and_never_show_the_scored_item(tmp_path):
    task = load_task(write_task(tmp_path / "t.jsonl", _items(10)))
    first = draw_shots(task, 3, seed=7)
    assert draw_shots(task, 3, seed=7) == first
    assert draw_shots(task, 3, seed=8) != first
    for item, shots in zip(task.items, first):
        assert len(shots) == 3 and item not in shots and len(set(shots)) == 3
    # --limit keeps the draws of the items it keeps (one generator, drawn item after item).
    assert draw_shots(task, 3, seed=7, limit=4) == first[:4]


def test_shots_come_from_the_train_split_when_there_is_one(tmp_path):
    task = load_task(write_task(tmp_path / "t.jsonl", _items(5) + _items(4, split="train")))
    assert len(task.items) == 5 and len(task.train) == 4
    for shots in draw_shots(task, 2):
        assert all(s.split == "train" for s in shots)


def test_prompt_format():
    shot = TaskItem("Q: 1 + 1?\nA:", ("2", "3"), 0)
    item = TaskItem("Q: 2 + 2?\nA:", ("4", "5"), 0)
    assert prompt_context(item, [shot, shot]) == "Q: 1 + 1?\nA: 2\n\nQ: 1 + 1?\nA: 2\n\nQ: 2 + 2?\nA:"
    assert FEWSHOT_DELIMITER == "\n\n"


# --------------------------------------------------------------------------------------------------------------
# Shipped tasks
# --------------------------------------------------------------------------------------------------------------
def test_shipped_tasks_are_valid_and_four_way():
    assert shipped_tasks() == ["arithmetic", "python_expressions", "shakespeare_names"]
    for name in shipped_tasks():
        task = load_task(name)
        assert isinstance(task, Task) and 50 <= len(task.items) <= 200
        assert all(len(item.choices) == 4 and len(set(item.choices)) == 4 for item in task.items)
        golds = [item.gold for item in task.items]
        assert set(golds) == {0, 1, 2, 3}  # the answer is not always in one place
        assert len({item.context for item in task.items}) > 0.9 * len(task.items)


def test_shipped_tasks_are_what_the_script_writes():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_eval_tasks
    finally:
        sys.path.remove(str(ROOT / "tools"))
    for name, content in make_eval_tasks.build_all(SHARED / "tinyshakespeare.txt").items():
        assert (TASK_DIR / name).read_text(encoding="utf-8") == content, name


def test_python_expression_answers_are_right():
    task = load_task("python_expressions")
    item = next(i for i in task.items if "sorted(" in i.context)
    expression = item.context.removeprefix("In Python, ").removesuffix(" evaluates to")
    assert item.choices[item.gold] == repr(sorted(json.loads(expression[len("sorted("):-1])))


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------
def test_eval_task_cli_prints_the_library_result(tiny_checkpoint, tiny_model, capsys):
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--task", "arithmetic", "--limit", "10", "--dtype", "fp32"]
    assert main([*args, "--json", "--shots", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, tokenizer = tiny_model
    expected = score_task(model, tokenizer, "arithmetic", shots=1, limit=10, dtype="fp32")
    assert printed == json.loads(json.dumps(expected.to_dict()))
    assert printed["items"] == 10 and printed["chance"] == 0.25
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("arithmetic: acc ") and "chance 0.2500" in line and "(10 items, 0-shot)" in line


GOOD = {"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}


@pytest.mark.parametrize("lines, extra, message", [
    ([json.dumps(GOOD), "{not json"], [], "t.jsonl:2: not JSON"),
    ([json.dumps({"context": "a", "choices": ["b", "c"]})], [], "t.jsonl:1: missing field 'gold'"),
    ([json.dumps(GOOD), json.dumps({**GOOD, "gold": 2})], [], "t.jsonl:2: \"gold\" is 2 but \"choices\" has 2"),
    ([json.dumps({**GOOD, "choices": ["4"]})], [], "t.jsonl:1: \"choices\" has 1 entries"),
    ([json.dumps({**GOOD, "gold": True})], [], "t.jsonl:1: \"gold\" must be an integer"),
    ([json.dumps({**GOOD, "choise": 1})], [], "t.jsonl:1: unknown field 'choise'"),
    ([json.dumps(GOOD)] * 3, ["--shots", "3"], "shots=3 but .*t.jsonl has 3 items, so at most 2"),
    ([json.dumps(GOOD)] * 3, ["--limit", "0"], "limit must be a positive integer"),
])
def test_bad_task_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, lines, extra, message):
    import re

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--task", str(path), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("minillama: error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("args", [[], ["--data", "x.txt", "--task", "arithmetic"]])
def test_eval_needs_exactly_one_of_data_and_task(tiny_checkpoint, capsys, args):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "one of --data PATH (bits per byte) or --task FILE.jsonl" in err


def test_unknown_task_name_lists_the_shipped_ones(tiny_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--task", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shipped: arithmetic, python_expressions, shakespeare_names" in err
