"""`toolbox eval`: evaluate a model (or predictions made elsewhere) on a dataset.

Modules, each torch-free unless it says so:
  data     records from JSONL / CSV / Parquet / Hugging Face datasets, validated per field
  tasks    task definitions (YAML / TOML files, built-ins) and prompt templates
  metrics  text metrics with a tokenization that is right for Japanese; choice accuracy
  stats    bootstrap confidence intervals and paired comparisons
  runner   runs a task through a model, an endpoint, or a predictions file; resumable output
  likelihood  continuation log-likelihoods split into tokens as lm-evaluation-harness splits them
  endpoint an OpenAI-compatible server as the model
  harness  lm-evaluation-harness adapter (imports lm_eval and torch)
  report   the summary table, JSON, and run comparison
"""
