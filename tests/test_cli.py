"""Bad input on the command line: exit code 2, exactly one line on stderr that starts with `minillama: error:`,
and no traceback — for argparse's own errors (a missing or mistyped argument) and the library's alike.

ERROR_ROWS is the table: (command line after `minillama`, split as a shell would; a substring of the error
line). In the command line, {text}, {binary}, {dir}, {tokenizer}, {checkpoint} and {data} name the fixtures below
(a small UTF-8 text, a file that is not UTF-8, a directory, a BPE tokenizer, a checkpoint with a 64-token context,
prepared data), {tiny_checkpoint} a checkpoint with another tokenizer and {missing} a path that does not exist. A
command, flag or check added later adds its rows here.
"""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minillama.cli import main

ERROR_ROWS = [
    # top level and presets
    ("nosuch", "invalid choice: 'nosuch'"),
    ("presets --bogus", "unrecognized arguments: --bogus"),
    # tokenizer
    ("tokenizer train --input {text} --vocab-size abc --out {missing}",
     "tokenizer train: argument --vocab-size: invalid int value: 'abc' (see: minillama tokenizer train --help)"),
    ("tokenizer train --input {text} --vocab-size 300", "required: --out"),
    ("tokenizer train --input {text} --vocab-size 0 --out {missing}", "vocab_size=0 is too small"),
    ("tokenizer train --input {text} --vocab-size 300 --out {missing} --min-frequency -3",
     "min_frequency=-3 must be at least 1"),
    ("tokenizer train --input {missing} --vocab-size 300 --out {dir}/t", "training file not found"),
    ("tokenizer train --input {dir} --vocab-size 300 --out {dir}/t", "is a directory"),
    ("tokenizer train --input {binary} --vocab-size 300 --out {dir}/t", "not UTF-8 text"),
    ("tokenizer train --input {text} --vocab-size 300 --out {text}", "cannot create directory"),
    ("tokenizer encode --tokenizer {missing} hi", "tokenizer not found"),
    ("tokenizer encode --tokenizer {text} hi", "neither a SentencePiece model nor a tiktoken rank file"),
    ("tokenizer decode --tokenizer {tokenizer} 1 99999", "token id 99999 is out of range"),
    ("tokenizer decode --tokenizer {tokenizer} abc", "argument IDS: invalid int value: 'abc'"),
    # data
    ("data prepare --out {dir}/d --tokenizer {tokenizer}", "needs --config FILE or --input PATH"),
    ("data prepare --input {missing} --out {dir}/d --tokenizer {tokenizer}", "data path not found"),
    ("data prepare --input {text} --out {dir}/d --tokenizer {missing}", "tokenizer not found"),
    ("data prepare --config {missing} --out {dir}/d --tokenizer {tokenizer}", "config file not found"),
    ("data prepare --config {dir} --out {dir}/d --tokenizer {tokenizer}", "cannot read config file"),
    ("data prepare --input {text} --out {dir}/d --tokenizer {tokenizer} --val-fraction 1.5",
     "data.val_fraction must be in [0, 1)"),
    ("data prepare --input {text} --out {dir}/d --tokenizer {tokenizer} --workers 0", "workers must be at least 1"),
    ("data prepare --input {text} --out {dir}/d --tokenizer {tokenizer} --train-tokens -5",
     "data.train_tokens must be positive"),
    ("data prepare --input {text} --out {text} --tokenizer {tokenizer}", "exists and is not a directory"),
    ("data inspect {data}", "required: --step"),
    ("data inspect {data} --step -1", "step must be a non-negative integer"),
    ("data inspect {data} --step 0 --seq-len 0", "seq_len must be a positive integer"),
    ("data inspect {data} --step 0 --batch-size 0", "batch_size must be a positive integer"),
    ("data inspect {data} --step 0 --rank 3 --world-size 2", "rank must be in [0, 2)"),
    ("data inspect {data} --step 0 --world-size 0", "world_size must be a positive integer"),
    ("data inspect {missing} --step 0", "is not a prepared data directory"),
    ("data inspect {text} --step 0", "is not a prepared data directory"),
    # train: each fails before the model is built (the test stops any run that gets that far)
    ("train --config {missing} --out {dir}/run", "config file not found"),
    ("train --config {dir} --out {dir}/run", "cannot read config file"),
    ("train --max-steps abc --data {text} --out {dir}/run", "argument --max-steps: invalid int value: 'abc'"),
    ("train --max-steps 0 --data {text} --out {dir}/run", "train.max_steps must be positive"),
    ("train --save-every -1 --data {text} --out {dir}/run", "train.save_every must be positive"),
    ("train --set nosuch --data {text} --out {dir}/run", "expected section.key=value"),
    ("train --set optim.lrr=1 --data {text} --out {dir}/run", "unknown key optim.lrr"),
    ("train --set train.max_steps=abc --data {text} --out {dir}/run", "train.max_steps must be an integer"),
    ("train --set optim.lr=-1 --data {text} --out {dir}/run", "optim.lr must be >= 0"),
    ("train --set optim.beta2=1 --data {text} --out {dir}/run", "optim.beta2 must be in [0, 1)"),
    ("train --set optim.eps=0 --data {text} --out {dir}/run", "optim.eps must be positive"),
    ("train --set optim.grad_clip=0 --data {text} --out {dir}/run", "optim.grad_clip must be positive"),
    ("train --set optim.warmup_steps=-1 --data {text} --out {dir}/run", "optim.warmup_steps must be >= 0"),
    ("train --set optim.min_lr_ratio=2 --data {text} --out {dir}/run", "optim.min_lr_ratio must be in [0, 1]"),
    ("train --set train.eval_tokens=0 --data {text} --out {dir}/run", "train.eval_tokens must be positive"),
    ("train --set train.sample_tokens=-1 --data {text} --out {dir}/run", "train.sample_tokens must be >= 0"),
    ("train --set train.dtype=fp16 --data {text} --out {dir}/run", "train.dtype must be 'auto', 'bf16' or 'fp32'"),
    ("train --set train.dropout=1.5 --data {text} --out {dir}/run", "train.dropout must be in [0, 1)"),
    ("train --set train.seq_len=100000 --data {text} --out {dir}/run", "is not a multiple of train.seq_len=100000"),
    ("train --set model.preset=llama9 --data {text} --out {dir}/run", "model.preset"),
    ("train --set train.device=tpu --out {dir}/run --data {text}", "unknown device 'tpu'"),
    ("train --data {text} --out {text}", "cannot create directory"),
    ("train --data {missing} --out {dir}/run", "data path not found"),
    ("train --out {dir}/fresh --resume", "no checkpoint"),
    # eval
    ("eval --checkpoint {checkpoint}", "eval needs one of --data PATH"),
    ("eval --checkpoint {checkpoint} --data {text} --seq-len 1000",
     "seq_len 1000 must be in 1..64 (the model's context)"),
    ("eval --checkpoint {checkpoint} --data {text} --seq-len 0", "seq_len 0 must be in 1..64"),
    ("eval --checkpoint {checkpoint} --data {data} --seq-len 1000", "seq_len 1000 must be in 1..64"),
    ("eval --checkpoint {checkpoint} --data {text} --batch-size 0", "batch_size must be a positive integer"),
    ("eval --checkpoint {missing} --data {text}", "not found"),
    ("eval --checkpoint {checkpoint} --data {missing}", "not a text file or a prepared data directory"),
    ("eval --checkpoint {checkpoint} --data {binary}", "not UTF-8 text"),
    ("eval --checkpoint {checkpoint} --data {text} --dtype fp16", "invalid choice: 'fp16'"),
    ("eval --checkpoint {checkpoint} --task nosuch", "no shipped task of that name"),
    ("eval --checkpoint {checkpoint} --task arithmetic --shots -1", "shots must be a non-negative integer"),
    ("eval --checkpoint {checkpoint} --task arithmetic --limit 0", "limit must be a positive"),
    ("eval --checkpoint {checkpoint} --task arithmetic --seq-len 1000", "seq_len 1000 must be in 1..64"),
    # generate
    ("generate --checkpoint {missing}", "not found"),
    ("generate --checkpoint {tokenizer}", "config.json"),
    ("generate --checkpoint {checkpoint} --max-new-tokens abc", "invalid int value: 'abc'"),
    ("generate --checkpoint {checkpoint} --temperature -1", "temperature must be a number >= 0"),
    ("generate --checkpoint {checkpoint} --top-k -1", "top_k"),
    ("generate --checkpoint {checkpoint} --max-new-tokens 0", "max_new_tokens"),
    ("generate --checkpoint {checkpoint} --min-p 1.5", "min_p"),
    ("generate --checkpoint {checkpoint} --top-p 1.5", "top_p must be in (0, 1]"),
    ("generate --checkpoint {checkpoint} --draft {missing}", "not found"),
    ("generate --checkpoint {checkpoint} --draft {tokenizer}", "config.json"),
    ("generate --checkpoint {checkpoint} --draft {tiny_checkpoint}", "draft checkpoint"),
    ("generate --checkpoint {checkpoint} --draft {checkpoint} --prompt-lookup 2", "exactly one drafter"),
    ("generate --checkpoint {checkpoint} --draft {checkpoint} --draft-tokens 0", "--draft-tokens) must be"),
    ("generate --checkpoint {checkpoint} --prompt-lookup 0", "--prompt-lookup) must be an integer >= 1"),
    ("generate --checkpoint {checkpoint} --prompt-lookup x", "argument --prompt-lookup: invalid int value"),
    ("generate --checkpoint {checkpoint} --draft-tokens 3", "give --draft CKPT or --prompt-lookup N"),
    # serve: each fails before a server starts
    ("serve", "required: --checkpoint"),
    ("serve --checkpoint {missing}", "not found"),
    ("serve --checkpoint {checkpoint} --max-batch 0", "--max-batch must be an integer >= 1"),
    ("serve --checkpoint {checkpoint} --max-queue 0", "--max-queue must be an integer >= 1"),
    ("serve --checkpoint {checkpoint} --port 70000", "--port must be in 0..65535"),
    ("serve --checkpoint {checkpoint} --max-context 1000", "max_len must be in [2, 64]"),
    ("serve --checkpoint {checkpoint} --threads 0", "--threads must be an integer >= 1"),
    ("serve --checkpoint {checkpoint} --api-key ' '", "the API key is empty"),
    ("serve --checkpoint {checkpoint} --draft {tiny_checkpoint}", "draft checkpoint"),
    ("serve --checkpoint {checkpoint} --quantize int3", "int3"),
    # plan
    ("plan", "give the model"),
    ("plan --model nosuch", "unknown preset 'nosuch'"),
    ("plan --model tiny --params 1e9", "give only one of --model, --config, --params"),
    ("plan --config {dir}", "cannot read config file"),
    ("plan --params 0", "--params must be positive"),
    ("plan --model tiny --tokens abc", "expected a number like 1.4e12 or 1.4T"),
    ("plan --model tiny --tokens nan", "expected a number"),
    ("plan --model tiny --gpus 1.5", "--gpus must be a whole number"),
    ("plan --model tiny --mfu 2", "--mfu must be in (0, 1]"),
    ("plan --model tiny --gpu nosuch", "unknown GPU 'nosuch'"),
    ("plan --model tiny --tp 3", "--tp 3 does not divide the model's 4 attention heads"),
    ("plan --model tiny --dp 2 --gpus 3", "differs from --gpus 3"),
    ("plan --model tiny --pue 0.5", "--pue must be >= 1"),
    ("plan --model tiny --zero 4", "argument --zero: invalid choice: '4'"),
    ("plan --model tiny --budget-dollars 100", "--budget-dollars needs --price-per-gpu-hour"),
]


@pytest.fixture(scope="module")
def paths(cli_inputs, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The files the rows name: conftest's `cli_inputs`, a file that is not UTF-8, a directory, a missing path,
    and `tiny_checkpoint` (another tokenizer than `checkpoint`'s)."""
    root = tmp_path_factory.mktemp("cli")
    binary = root / "binary.txt"
    binary.write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    (root / "dir").mkdir()
    return dict(cli_inputs, binary=binary, dir=root / "dir", missing=root / "missing", tiny_checkpoint=tiny_checkpoint)


def fill(command: str, paths: dict) -> list[str]:
    return [arg.format(**{k: str(v) for k, v in paths.items()}) for arg in shlex.split(command)]


@pytest.mark.parametrize("command, expected", ERROR_ROWS, ids=[command for command, _ in ERROR_ROWS])
def test_bad_input_is_one_line_and_exit_code_2(command, expected, paths, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAMA_CACHE", str(paths["cache"]))
    monkeypatch.chdir(tmp_path)  # whatever a row writes by default (runs/default, ...) lands here

    def no_training(*args, **kwargs):
        raise AssertionError(f"`minillama {command}` was accepted and went on to train")

    monkeypatch.setattr("minillama.train.trainer.build_model", no_training)
    capsys.readouterr()
    code = main(fill(command, paths))  # an exception escaping here is the traceback the user would have seen
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("minillama: error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


def test_bad_input_in_a_real_process(paths):
    """The same through `python -m minillama.cli`: the process's exit code is 2 and stderr one line."""
    argv = fill("eval --checkpoint {checkpoint} --data {text} --seq-len 1000", paths)
    proc = subprocess.run([sys.executable, "-m", "minillama.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "minillama: error: seq_len 1000 must be in 1..64 (the model's context)\n"


def test_help_is_exit_code_0(capsys):
    assert main(["eval", "--help"]) == 0
    assert "--seq-len" in capsys.readouterr().out
