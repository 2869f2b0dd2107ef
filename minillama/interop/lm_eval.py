"""The "minillama" model type for EleutherAI's lm-evaluation-harness (`pip install "minillama[eval]"`).

    minillama lm-eval --model minillama --model_args checkpoint=DIR --tasks hellaswag      # lm_eval's CLI
    import minillama.interop.lm_eval; lm_eval.simple_evaluate(model="minillama", model_args={"checkpoint": DIR}, ...)

lm-eval (0.4.13) finds a model type only in its own table (`lm_eval/models/__init__.py` MODEL_MAPPING) or among
classes registered with `@register_model` by modules already imported in the process: it reads no entry points,
and `--include_path` adds task YAMLs, not models. A plain `lm_eval --model minillama` therefore cannot see this
class unless something imports this module inside lm_eval's process first; `minillama lm-eval ARGS...` is that
step (it imports this module, then runs lm_eval's own CLI with ARGS unchanged). See docs/evaluation.md.

model_args: checkpoint (required), device (cuda when available, else cpu; also when a CUDA device is asked for
and there is none, as lm_eval's CLI asks for cuda:0 by default), dtype (bf16 autocast, or fp32), max_length
(default: the model's max_seq_len), max_gen_toks (256), add_bos_token (True when the tokenizer has BOS), seed
(sampling seed, 1234). batch_size comes from lm_eval's --batch_size ("auto" means 8).

Scoring goes through `minillama.tasks.score_continuations`, the function behind `minillama eval --task`, and
lm-eval's own TemplateLM splits context and continuation, so the two agree on the same items.
"""

from __future__ import annotations

import logging
import sys

# lm-eval fills its registry from lm_eval.models only when the registry is empty (api/registry.py get_model);
# registering "minillama" into an empty registry would hide "hf" and every other built-in model type.
import lm_eval.models  # noqa: F401  (imported for its side effect)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from minillama.errors import MinillamaError
from minillama.runtime import autocast_dtype
from minillama.tasks import score_continuations

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8  # used for --batch_size auto: we do not probe memory as lm-eval's HFLM does


def _batch_size(value: int | str | None) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise MinillamaError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise MinillamaError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


def _device(name: str | None) -> torch.device:
    # lm_eval's CLI passes device="cuda:0" unless told otherwise, on any machine; like its HFLM, fall back to the
    # CPU when there is no CUDA device rather than fail.
    if name in (None, "", "auto") or (name.startswith("cuda") and not torch.cuda.is_available()):
        if name not in (None, "", "auto"):
            logger.warning("minillama: device %s requested but CUDA is not available; using the CPU", name)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@register_model("minillama")
class MinillamaLM(TemplateLM):
    """A minillama (or any Hugging Face Llama) checkpoint directory as an lm-eval language model."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str = "bf16",
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 seed: int = 1234, **ignored) -> None:
        super().__init__()
        from minillama.checkpoint import load

        if checkpoint is None:
            raise MinillamaError("the minillama model type needs --model_args checkpoint=DIR")
        if ignored:
            logger.warning("minillama: ignoring model_args %s", ", ".join(sorted(ignored)))
        self._device = _device(device)
        autocast_dtype(dtype, self._device)  # auto, bf16 or fp32; anything else is one line naming it
        self.model, self.tokenizer = load(checkpoint, device=self._device)
        if self.tokenizer is None:
            raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files")
        self.model.eval()
        self.checkpoint, self.dtype, self.seed = str(checkpoint), dtype, int(seed)
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        if not 1 <= self._max_length <= self.model.cfg.max_seq_len:
            raise MinillamaError(f"max_length {self._max_length} must be in 1..{self.model.cfg.max_seq_len}")
        self.max_gen_toks = int(max_gen_toks)
        has_bos = self.tokenizer.bos_id is not None
        self.add_bos_token = has_bos if add_bos_token is None else bool(add_bos_token) and has_bos

    # ---- what TemplateLM needs -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context (and the first rolling window) is conditioned on: BOS, as in training.
        return self.tokenizer.bos_id if self.add_bos_token else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"minillama-{self.tokenizer.fingerprint[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return score_continuations(self.model, pairs, self.batch_size, self.max_length, self.dtype)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), as TemplateLM.loglikelihood
        made them."""
        results = self._score([(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests])
        for (strings, _, _), answer in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    # ---- perplexity -----------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm-eval's disjoint windows of max_length tokens: the first
        window is conditioned on the prefix token (BOS), each later one on the token before it, and the last one
        is given a full window of context though it scores only its new tokens."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            ids = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop string (greedy unless do_sample), every request decoded together
        by the batched engine (`minillama.infer.Engine`), the prompt left-truncated to leave room for the new
        tokens as HFLM does."""
        from minillama.infer import Engine, SamplingParams

        if not requests:
            return []
        prompts, params, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = tuple(s for s in kwargs.pop("until") if s)
            max_new = min(int(kwargs.pop("max_gen_toks")), self.max_length - 1)
            sample = kwargs.pop("do_sample", False)
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new):])
            params.append(SamplingParams(max_new_tokens=max_new,
                                         temperature=float(kwargs.pop("temperature", 1.0)) if sample else 0.0,
                                         top_k=kwargs.pop("top_k", None) if sample else None,
                                         top_p=(kwargs.pop("top_p", None) or 1.0) if sample else 1.0,
                                         stop=until, seed=self.seed))
            stops.append(until)
        engine = Engine(self.model, self.tokenizer, max_batch=min(self.batch_size, len(prompts)),
                        max_len=self.max_length)
        outputs = []
        for request, until, completion in zip(requests, stops, engine.generate(prompts, params)):
            text = postprocess_generated_text(completion.text, until, None)
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs


def run_cli(argv: list[str]) -> None:
    """lm_eval's command line, with the "minillama" model type registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm_eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
