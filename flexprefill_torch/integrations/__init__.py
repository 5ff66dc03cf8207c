"""Integrations of FlexPrefill with other libraries.

* :mod:`flexprefill_torch.integrations.transformers` — ``attn_implementation="flex_prefill"``
  for Hugging Face transformers (registered when ``flexprefill_torch`` is imported).
"""
