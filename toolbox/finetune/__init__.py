"""`toolbox finetune`: adapt a series model to your data (classification, tagging, language modelling).

`data` reads and checks records and encodes them with sentencepiece (no torch);
`train` runs transformers' Trainer (LoRA through peft by default) and writes a model
directory in the Hugging Face layout with a model card (`card`); `progress` shows and
logs the run. Importing this package imports neither torch nor transformers.
"""

from toolbox.finetune.data import TASKS, DataSpec, Fields

__all__ = ["TASKS", "DataSpec", "Fields"]
