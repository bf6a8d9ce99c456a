"""The defended serving gateway (issue 7): a model behind switchable defences over HTTP.

``modelshield serve --model PATH --defense label-only --defense rate=10/s`` or, from
Python::

    from modelshield.serve import Gateway, create_app, serve_in_thread

    gateway = Gateway(classifier, ["top-k=1", "budget=5000", "prada=0.9,action=block"])
    url, stop = serve_in_thread(create_app(gateway))

The ``ood`` detector needs benign reference inputs: ``Gateway(classifier,
[OodDefense(1e-4, reference=x_val, action="block")])`` (``--reference-data`` on the CLI).

Defences and the detectors live in :mod:`modelshield.serve.defenses` and
:mod:`modelshield.serve.detector` (importable without FastAPI); the HTTP layer in
:mod:`modelshield.serve.app` and :mod:`modelshield.serve.server` needs the ``serve`` extra
(``fastapi``, ``uvicorn``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelshield.serve.app import Backend, Gateway, create_app, load_gateway
    from modelshield.serve.defenses import GATEWAY_DEFENSES, OodDefense, parse_defense
    from modelshield.serve.detector import OodMonitor, PradaMonitor, ks_2samp, shapiro_wilk
    from modelshield.serve.server import run, serve_in_thread

__all__ = [
    "GATEWAY_DEFENSES",
    "Backend",
    "Gateway",
    "OodDefense",
    "OodMonitor",
    "PradaMonitor",
    "create_app",
    "ks_2samp",
    "load_gateway",
    "parse_defense",
    "run",
    "serve_in_thread",
    "shapiro_wilk",
]

_LAZY = {
    "Backend": "modelshield.serve.app",
    "Gateway": "modelshield.serve.app",
    "create_app": "modelshield.serve.app",
    "load_gateway": "modelshield.serve.app",
    "GATEWAY_DEFENSES": "modelshield.serve.defenses",
    "parse_defense": "modelshield.serve.defenses",
    "OodDefense": "modelshield.serve.defenses",
    "OodMonitor": "modelshield.serve.detector",
    "ks_2samp": "modelshield.serve.detector",
    "PradaMonitor": "modelshield.serve.detector",
    "shapiro_wilk": "modelshield.serve.detector",
    "run": "modelshield.serve.server",
    "serve_in_thread": "modelshield.serve.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
