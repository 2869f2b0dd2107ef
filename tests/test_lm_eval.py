"""lm-evaluation-harness with --model minillama (minillama/interop/lm_eval.py), on the local YAML tasks of
tests/data/lm_eval (JSONL files through `dataset_path: json`; nothing is downloaded).

It must agree with our own commands: `minillama eval --task` (same prompts, same log-likelihoods, same acc and
acc_norm) and `minillama eval --data` (bits per byte, up to the end-of-text token that only we score).
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from minillama.cli import main
from minillama.errors import MinillamaError
from minillama.infer import Engine, SamplingParams
from minillama.interop.lm_eval import MinillamaLM
from minillama.tasks import (
    TARGET_DELIMITER,
    TASK_DIR,
    draw_shots,
    load_task,
    prompt_context,
    score_continuations,
    score_task,
)

ROOT = Path(__file__).resolve().parents[1]
EVAL_DATA = ROOT / "tests" / "data" / "lm_eval"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """tests/data/lm_eval's YAML tasks with absolute data paths and a private datasets cache, plus one for a
    shipped task file (shakespeare_names) written from the same template."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    configs = {path.name: yaml.safe_load(path.read_text()) for path in EVAL_DATA.glob("*.yaml")}
    shipped = dict(configs["minillama_mc.yaml"], task="minillama_shakespeare_names",
                   dataset_kwargs={"data_files": {"test": str(TASK_DIR / "shakespeare_names.jsonl")}})
    configs["shakespeare_names.yaml"] = shipped
    for name, cfg in configs.items():
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"] = {"data_files": {split: str(ROOT / f) for split, f in files.items()},
                                 "cache_dir": str(out / "datasets")}
        (out / name).write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def lm(tiny_checkpoint) -> MinillamaLM:
    return MinillamaLM(checkpoint=str(tiny_checkpoint), dtype="fp32", batch_size=4, device="cpu")


def evaluate(model, tasks_dir: Path, task: str, shots: int = 0, limit: int | None = None, **kwargs) -> dict:
    # The shots' seed stays lm-eval's default (1234); the global random, numpy and torch seeds are left alone.
    return lm_eval.simple_evaluate(model=model, tasks=[task], num_fewshot=shots, limit=limit, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                   random_seed=None, numpy_random_seed=None, torch_random_seed=None, **kwargs)


def test_the_model_type_is_registered_beside_lm_evals_own(tiny_checkpoint):
    assert get_model("minillama") is MinillamaLM
    assert get_model("dummy").__name__ == "DummyLM"  # the built-in table is still there
    lm = get_model("minillama").create_from_arg_string(f"checkpoint={tiny_checkpoint},dtype=fp32,max_length=64",
                                                       {"batch_size": "auto", "device": "cpu"})
    assert (lm.max_length, lm.batch_size, lm.dtype, str(lm.device)) == (64, 8, "fp32", "cpu")
    with pytest.raises(MinillamaError, match="checkpoint=DIR"):
        get_model("minillama").create_from_arg_string("")


@pytest.mark.parametrize("task, path, shots, limit", [
    ("minillama_mc", EVAL_DATA / "mc.jsonl", 0, None),  # includes an empty context and a trailing space
    ("minillama_mc", EVAL_DATA / "mc.jsonl", 3, None),
    ("minillama_shakespeare_names", TASK_DIR / "shakespeare_names.jsonl", 2, 8),
])
def test_multiple_choice_agrees_with_minillama_eval_task(lm, tiny_model, tasks_dir, task, path, shots, limit):
    out = evaluate(lm, tasks_dir, task, shots, limit)
    model, tokenizer = tiny_model
    ours = score_task(model, tokenizer, path, shots=shots, limit=limit, batch_size=4, dtype="fp32")
    metrics = out["results"][task]
    assert metrics["acc,none"] == pytest.approx(ours.acc)
    assert metrics["acc_norm,none"] == pytest.approx(ours.acc_norm)
    assert metrics["acc_stderr,none"] == pytest.approx(ours.acc_stderr)
    # Item by item: the same prompt (lm-eval drew the same shots), the same continuations and log-likelihoods.
    loaded = load_task(path)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == ours.items == len(loaded.items[:limit])
    for sample, item, examples, prediction in zip(samples, loaded.items, draw_shots(loaded, shots, limit=limit),
                                                  ours.predictions):
        assert [context for context, _ in sample["arguments"]] == [prompt_context(item, examples)] * len(item.choices)
        assert [choice for _, choice in sample["arguments"]] == [TARGET_DELIMITER + c for c in item.choices]
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(prediction["lls"], abs=1e-4)


def test_rolling_bits_per_byte_agrees_with_minillama_eval_data(tiny_checkpoint, tiny_model, tasks_dir, tmp_path,
                                                              capsys):
    text = json.loads((EVAL_DATA / "text.jsonl").read_text())["text"]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    model, tokenizer = tiny_model
    # We score the end-of-text token after the text; lm-eval's loglikelihood_rolling does not.
    ids = tokenizer.encode(text, bos=True)
    eos_nats = -score_continuations(model, [(ids, [tokenizer.eos_id])], dtype="fp32")[0][0]
    for seq_len in (1024, 64):
        lm = MinillamaLM(checkpoint=str(tiny_checkpoint), dtype="fp32", batch_size=4, max_length=seq_len)
        theirs_bpb = evaluate(lm, tasks_dir, "minillama_text")["results"]["minillama_text"]["bits_per_byte,none"]
        assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "text.txt"), "--json",
                     "--seq-len", str(seq_len), "--dtype", "fp32"]) == 0
        ours = json.loads(capsys.readouterr().out)
        theirs_nats = theirs_bpb * math.log(2) * n_bytes
        ours_nats = ours["bits_per_byte"] * math.log(2) * ours["bytes"]
        assert ours["bytes"] == n_bytes and ours["tokens"] == len(ids)  # the text's tokens + EOS
        if seq_len == 1024:
            # One window each: the same tokens on the same context; only the EOS term differs.
            assert ours_nats - theirs_nats == pytest.approx(eos_nats, abs=1e-3)
        else:
            # 10 windows of 64: lm-eval gives the last window a full context (we give it what is left), so the
            # last few tokens' scores differ a little as well.
            assert abs(ours_nats - eos_nats - theirs_nats) < 0.01 * theirs_nats


def _requests(*args) -> list[Instance]:
    return [Instance("generate_until", {}, arguments, index) for index, arguments in enumerate(args)]


def test_generate_until_is_greedy_and_cut_at_the_stop_string(lm, tiny_model):
    model, tokenizer = tiny_model
    prompt = "Shall I compare thee"
    (completion,) = Engine(model, tokenizer).generate([tokenizer.encode(prompt, bos=True)],
                                                      SamplingParams(max_new_tokens=24, temperature=0))
    greedy_ids = completion.token_ids
    greedy = tokenizer.decode(greedy_ids)
    assert len(greedy) >= 8
    stop = greedy[4:7]
    outputs = lm.generate_until(_requests((prompt, {"until": [], "max_gen_toks": 24}),
                                          (prompt, {"until": [stop], "max_gen_toks": 24}),
                                          (prompt, {"until": ["\n\n"], "max_gen_toks": 3, "do_sample": False})))
    assert outputs[0] == greedy
    assert outputs[1] == greedy[:greedy.index(stop)]
    assert outputs[2] == tokenizer.decode(greedy_ids[:3]).split("\n\n")[0]


# ~25 s: lm_eval's CLI indexes its thousands of built-in task files first
def test_lm_eval_cli_runs_minillama_in_a_subprocess(tiny_checkpoint, tasks_dir, tmp_path):
    """`minillama lm-eval` is lm_eval's own CLI with the model type registered (lm_eval's parser, tables, output)."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "minillama.cli", "lm-eval", "--model", "minillama",
               "--model_args", f"checkpoint={tiny_checkpoint},dtype=fp32", "--tasks", "minillama_mc",
               "--include_path", str(tasks_dir), "--batch_size", "4", "--output_path", str(tmp_path / "results")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **OFFLINE)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "minillama_mc" in done.stdout and "acc_norm" in done.stdout
    written = list((tmp_path / "results").rglob("results_*.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["results"]["minillama_mc"]["acc,none"] >= 0
    print(f"lm-eval CLI run: {time.perf_counter() - started:.1f} s")
