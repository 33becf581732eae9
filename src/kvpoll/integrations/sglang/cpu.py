"""Stand-ins for triton and torchvision, so that SGLang imports on a CPU-only machine.

For the test suite and ``kvpoll bench sglang``, which drive SGLang's own
classes without a GPU. SGLang's disaggregation package imports modules that
import ``triton`` (GPU kernels) and ``torchvision`` (image processors) at
module level; neither is used by what they run. Where either is installed,
:func:`install` does nothing. :func:`install` first lets torch and transformers
probe for the real packages (they cache the answer: absent), then serves any
``triton.*`` / ``torchvision.*`` import as a module whose every attribute is an
inert callable class. Nothing else of SGLang is replaced.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

STUBBED = ("triton", "torchvision")


class _Inert:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return _Inert()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __getitem__(self, key: Any) -> Any:
        return _Inert()


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Inert,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] not in STUBBED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _InertModule(spec.name)
        module.__path__ = []
        module.__dict__["__version__"] = "0.0.0+stub"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Make ``import sglang.srt.disaggregation...`` work here (idempotent)."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name in STUBBED:
        try:
            __import__(name)
        except ImportError:
            continue
        return  # the real package is installed: nothing to stand in for
    import torch._dynamo
    import torch._inductor.runtime.triton_compat  # noqa: F401
    import torch.utils._triton as triton_probe
    import transformers.utils.import_utils as hf

    triton_probe.has_triton_package()
    hf.is_torchvision_available()
    sys.meta_path.append(_Finder())
