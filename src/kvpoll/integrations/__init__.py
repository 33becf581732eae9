"""Adapters that put kvpoll inside serving engines.

Each adapter imports its engine only when used; kvpoll itself never requires
one. :mod:`kvpoll.integrations.sglang`: a transfer backend for SGLang's
prefill/decode disaggregation.
"""
