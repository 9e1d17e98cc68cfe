"""open_clip's tokenizer as the backbone's `text_tokenizer`: small, picklable, built on first use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class OpenCLIPTokenize:
    """Texts -> `input_ids` and `attention_mask` with open_clip's tokenizer (context 77).

    Small and picklable: the tokenizer itself is built on first use in each process (data loader
    workers get the settings only). `attention_mask` covers the tokens up to the end-of-text token
    (id 0 pads, but it is also the BPE token of "!", so it is not read as padding). For a causal text
    tower that pools at the end-of-text token, padding after the longest text is cut (as Hugging Face
    tokenizers pad to the longest); otherwise every row keeps the full context.
    """

    def __init__(self, context_length: int, trim: bool, tokenizer_kwargs: Mapping | None = None):
        self.context_length, self.trim = int(context_length), bool(trim)
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.context_length, **self.tokenizer_kwargs)
        return self._tokenizer

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizer
        ids = tokenizer(list(texts), context_length=self.context_length)
        eot = (ids == tokenizer.eot_token_id).int().argmax(-1)  # each row has one (truncation keeps it)
        mask = (torch.arange(ids.shape[1])[None, :] <= eot[:, None]).long()
        if self.trim and len(ids):
            length = int(eot.max()) + 1
            ids, mask = ids[:, :length], mask[:, :length]
        return {"input_ids": ids, "attention_mask": mask}
