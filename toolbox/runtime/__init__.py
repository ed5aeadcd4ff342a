"""Our own GPT-NeoX inference path, shared by every backend.

A small, gpt-fast-style runtime: a plain PyTorch model with a static KV cache
(``model``), checkpoint loading without transformers (``config``, ``weights``),
on-device token sampling (``sampling``) and the generation/scoring loops
(``generation``). Importing this package is cheap; the submodules import torch.
"""
