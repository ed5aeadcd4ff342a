"""Fine-tuned classification heads on the project's own GPT-NeoX runtime.

A `toolbox finetune classify` / `tag` output is a transformers checkpoint of
``GPTNeoXForSequenceClassification`` (a bias-free ``score`` Linear read at each
sequence's last non-pad token) or ``GPTNeoXForTokenClassification`` (a ``classifier``
Linear with bias, read at every token). Here the backbone is the runtime's `GPTNeoX`
(its cache-free `forward_full`, stopping before the LM head, which these checkpoints
do not have) and the head is a plain Linear with the checkpoint's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from toolbox.config import NeoXConfig
from toolbox.runtime.model import GPTNeoX
from toolbox.runtime.weights import find_weight_files, hf_to_ours, iter_tensors

ARCHITECTURES = {
    "GPTNeoXForSequenceClassification": ("classify", "score", False),
    "GPTNeoXForTokenClassification": ("tag", "classifier", True),
}


def head_architecture(config: dict) -> str | None:
    """The head architecture a parsed config.json names, or None for any other model."""
    return next((a for a in config.get("architectures") or () if a in ARCHITECTURES), None)


class HeadModel(nn.Module):
    """A GPT-NeoX backbone plus a classification head; `task` is "classify" or "tag"."""

    def __init__(self, config: NeoXConfig, architecture: str, labels: list[str], pad_token_id: int | None):
        super().__init__()
        self.task, head_name, bias = ARCHITECTURES[architecture]
        self.config, self.labels, self.pad_token_id = config, labels, pad_token_id
        self.backbone = GPTNeoX(config)
        del self.backbone.embed_out  # no LM head in these checkpoints (and none needed)
        self.head_name = head_name
        self.head = nn.Linear(config.hidden_size, len(labels), bias=bias)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> HeadModel:
        """Load a head checkpoint directory (config.json + weights) onto ``device`` as ``dtype``."""
        model_dir = Path(model_dir)
        file = model_dir / "config.json"
        data = json.loads(file.read_text(encoding="utf-8"))
        architecture = head_architecture(data)
        if architecture is None:
            raise ValueError(f"{file}: 'architectures' is {data.get('architectures')}, "
                             f"expected one of {', '.join(ARCHITECTURES)}")
        # the backbone's hyper-parameters read as the causal LM's (the same GPT-NeoX body)
        config = NeoXConfig.from_dict({**data, "architectures": ["GPTNeoXForCausalLM"]}, source=str(file))
        id2label = data.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]
        if not labels:
            raise ValueError(f"{file}: no id2label (the head's label names)")
        device = torch.device(device)
        with torch.device("meta"):
            model = cls(config, architecture, labels, data.get("pad_token_id"))
        expected = {name for name, _ in model.named_parameters()}
        state = {}
        for name, tensor in iter_tensors(find_weight_files(model_dir), device):
            ours = hf_to_ours(name)
            if ours is None:
                continue
            ours = f"head.{ours.removeprefix(model.head_name + '.')}" if ours.startswith(model.head_name + ".") \
                else f"backbone.{ours}"
            if ours not in expected:
                raise ValueError(f"{model_dir}: unexpected tensor {name!r} in the checkpoint")
            state[ours] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor
        missing = sorted(expected - state.keys())
        if missing:
            raise ValueError(f"{model_dir}: checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing)")
        if model.head.weight.shape != state["head.weight"].shape:
            raise ValueError(f"{model_dir}: head weight {tuple(state['head.weight'].shape)} does not match "
                             f"{len(labels)} labels of hidden size {config.hidden_size}")
        model.load_state_dict(state, strict=True, assign=True)
        model.backbone._init_rotary(device)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """fp32 logits of a right-padded batch ``input_ids [B,T]`` with real lengths ``lengths [B]``:
        ``[B, labels]`` at each row's last real token (classify) or ``[B,T,labels]`` (tag)."""
        T = input_ids.shape[1]
        mask = torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None]
        hidden = self.backbone.forward_full(input_ids, mask, hidden=True)
        if self.task == "classify":
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.head(hidden).float()

    def predict(self, batch: list[list[int]]) -> list[Tensor]:
        """Label probabilities per sequence: ``[labels]`` (classify) or ``[len, labels]`` (tag)."""
        lengths = torch.tensor([len(ids) for ids in batch], device=self.device)
        pad = self.pad_token_id or 0
        ids = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long, device=self.device)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        with torch.inference_mode():
            probs = self.forward(ids, lengths).softmax(-1).cpu()
        if self.task == "classify":
            return list(probs)
        return [probs[i, : len(seq)] for i, seq in enumerate(batch)]
