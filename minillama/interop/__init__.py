"""Interoperation with other tools: the lm-evaluation-harness model type (`minillama.interop.lm_eval`)."""
