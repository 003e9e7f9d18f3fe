"""llama_cpp.Llama, the reference side of tests and benches, loading models as edge-lora does.

edge-lora loads every model with ggml's extra buffer types (AMX, repacked weights) only where the
probe showed they run (``edge_lora.serving.extra_buffers``). ``llama_cpp.Llama`` has no parameter for it
and defaults them on, so on a CPU whose AMX traps a test's reference load dies by SIGSEGV at its
first batch while edge-lora's own loads run. After ``follow_extra_buffer_verdict()`` the defaults
``Llama`` starts from carry the same verdict. Only the ``Llama`` class sees the change: its module
gets a view of the bindings in which that one function differs.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import llama_cpp.llama_cpp as bindings

llama_class_module = importlib.import_module("llama_cpp.llama")


class _BindingsWithVerdict(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(bindings, name)

    @staticmethod
    def llama_model_default_params() -> bindings.llama_model_params:
        from edge_lora.serving import extra_buffers# looked up per call: tests replace the verdict

        params = bindings.llama_model_default_params()
        params.use_extra_bufts = extra_buffers.use_extra_buffers()
        return params


def follow_extra_buffer_verdict() -> None:
    """Idempotent; for the whole process."""
    if not isinstance(llama_class_module.llama_cpp, _BindingsWithVerdict):
        llama_class_module.llama_cpp = _BindingsWithVerdict("llama_cpp.llama_cpp (edge-lora's verdict)")
