"""Select methods in ``pruned_moe``: per-request expert selection from the request context only.

`SelectMixin` sits before HFLM in `PrunedMoELM`'s bases and is inert unless the method's kind is
``select``. Then:

- loglikelihood (and rolling) requests: before HFLM batches them, each request's context is the
  part of its model input that precedes the continuation (``inp[:len(inp) - len(cont) + 1]``, after
  HFLM's left truncation). Its selection is computed once per distinct context (`context_signature`
  of the context alone, then the selector) and cached; every answer choice of a document shares it.
  At `_model_call` each padded row is matched to its request input, and the batch runs under
  per-row routing masks (`sample_mask`). Two requests whose inputs coincide (same tokens, different
  context/continuation split) share one forward row in HFLM; that row uses the shorter context,
  which is a prefix of both contexts (still never a continuation token).
- generate_until: the selection comes from each (unpadded) prompt; decode steps keep its mask.
- ``batch_size=auto``: lm-eval's probe forwards made-up inputs of the longest length; they belong to no
  request, so they run without selection.

``record`` (the results' ``config["moebench"]``) gains ``kind: "select"``, ``selection`` (requests,
selection seconds per request: mean / p50 / max), ``keep_frequency`` (layer -> per-expert fraction of
contexts that kept it) and, with ``offload=true``, the offload counters.
"""

from __future__ import annotations

import statistics as pystats

import torch

from moebench.moe.view import MoEError, MoEView


class SelectMixin:
    """Per-request selection for `PrunedMoELM` (see the module docstring); ``self.applied`` selects."""

    applied = None

    @property
    def _selecting(self) -> bool:
        return self.applied is not None and self.applied.selects

    def _start_select(self, record: dict) -> dict:
        """Start the select bookkeeping; returns the record extended with it."""
        self._selections: dict[tuple, dict[int, list[int]]] = {}
        self._input_context: dict[tuple, int] = {}
        self._input_lengths: set[int] = set()
        view = MoEView(self.model)
        self._kept_counts = {layer.index: torch.zeros(layer.num_experts) for layer in view.layers}
        record.update(kind="select", selection={"requests": 0}, keep_frequency={})
        if self.applied.offloader is not None:
            record["offload"] = self.applied.offloader.counters  # updated in place as requests run
        return record

    def _select_for(self, context: tuple) -> dict[int, list[int]]:
        """The (cached) selection of one context's tokens."""
        if context not in self._selections:
            if not context:
                raise MoEError("a request has an empty context: there is nothing to select experts from")
            keep = self.applied.select(context)
            self._selections[context] = keep
            for index, ids in keep.items():
                self._kept_counts[index][ids] += 1
            self._update_record()
        return self._selections[context]

    def _update_record(self) -> None:
        n, secs = len(self._selections), self.applied.select_seconds
        self.record["selection"] = {"requests": n, "seconds_mean": sum(secs) / len(secs),
                                    "seconds_p50": pystats.median(secs), "seconds_max": max(secs)}
        self.record["keep_frequency"] = {str(i): [round(float(c) / n, 4) for c in counts]
                                         for i, counts in sorted(self._kept_counts.items())}

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        if not self._selecting:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        for _, context_enc, continuation_enc in requests:
            inp = tuple((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            n_ctx = len(inp) - len(continuation_enc) + 1
            self._select_for(inp[:n_ctx])
            self._input_context[inp] = min(n_ctx, self._input_context.get(inp, n_ctx))
            self._input_lengths.add(len(inp))
        return super()._loglikelihood_tokens(requests, *args, **kwargs)

    def _row_selection(self, row: list[int]) -> dict[int, list[int]]:
        """The selection of a padded model-input row: its request input is the longest known prefix."""
        for n in sorted((n for n in self._input_lengths if n <= len(row)), reverse=True):
            n_ctx = self._input_context.get(tuple(row[:n]))
            if n_ctx is not None:
                return self._selections[tuple(row[:n_ctx])]
        raise MoEError("pruned_moe (select): a model input matches no request seen by _loglikelihood_tokens")

    def _detect_batch_size(self, *args, **kwargs):
        """lm-eval's ``batch_size=auto`` probe: forwards of made-up inputs (no request's), run without selection
        (a selection changes which experts run, not the memory a batch needs)."""
        self._probing = True
        try:
            return super()._detect_batch_size(*args, **kwargs)
        finally:
            self._probing = False

    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self._selecting or not self._input_context or getattr(self, "_probing", False):
            return super()._model_call(inps, attn_mask, labels)
        keeps = [self._row_selection(row) for row in inps.tolist()]
        with self.applied.batch(keeps):
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if not self._selecting:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        rows = [row[m.bool()] if mask is not None else row for row, m in zip(context, mask if mask is not None
                                                                             else context, strict=True)]
        keeps = [self._select_for(tuple(r.tolist())) for r in rows]
        with self.applied.batch(keeps):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
