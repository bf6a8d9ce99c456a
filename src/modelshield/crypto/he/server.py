"""The encrypted-inference HTTP service (FastAPI on uvicorn, 127.0.0.1 by default).

The server holds the plan and never a secret key:

- ``GET /v1/plan``: the plan summary and CKKS parameters (what a client needs to keygen);
- ``POST /v1/contexts``: body = a public TenSEAL context; answers ``{"context_id"}``.
  A context carrying a secret key, or made for other parameters, is refused (400);
- ``POST /v1/infer/{context_id}?mode=latency|throughput``: body = ciphertexts
  (:func:`~.runtime.pack_blobs`); answers encrypted outputs in the same format, with the
  server's compute time in ``X-HE-Server-Seconds``.
"""

# no "from __future__ import annotations": FastAPI reads the endpoint annotations at run time

import logging
import threading
from collections import OrderedDict
from typing import Any

from modelshield.core.errors import ModelShieldError
from modelshield.crypto.he.keys import fingerprint, load_public
from modelshield.crypto.he.params import CKKSParams
from modelshield.crypto.he.plan import Plan
from modelshield.crypto.he.runtime import MODES, evaluate, pack_blobs, unpack_blobs

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 8


def context_params(ctx: Any) -> tuple[int, list[int]]:
    """(N, coeff-modulus bit sizes) of a TenSEAL context."""
    from tenseal import sealapi  # noqa: F401  (registers SEAL's types with pybind11)

    parms = ctx.seal_context().data.key_context_data().parms()
    return int(parms.poly_modulus_degree()), [int(q.bit_count()) for q in parms.coeff_modulus()]


def create_app(plan: Plan, params: CKKSParams) -> Any:
    """The FastAPI app serving ``plan`` on ciphertexts."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="modelshield encrypted inference", docs_url=None, redoc_url=None)
    contexts: OrderedDict[str, Any] = OrderedDict()
    lock = threading.Lock()  # SEAL evaluation on the shared contexts: one request at a time

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/v1/plan")
    def get_plan() -> Any:
        return {"plan": plan.summary(), "params": params.to_dict(), "modes": list(MODES)}

    @app.post("/v1/contexts")
    async def post_context(request: Request) -> Any:
        body = await request.body()
        try:
            ctx = load_public(body)
        except ModelShieldError as exc:
            return error(400, str(exc))
        n, bits = context_params(ctx)
        if n != params.poly_modulus_degree or bits != list(params.coeff_mod_bit_sizes):
            return error(
                400,
                f"context parameters (N={n}, {bits}) differ from the plan's "
                f"(N={params.poly_modulus_degree}, {list(params.coeff_mod_bit_sizes)})",
            )
        cid = fingerprint(body)
        with lock:
            contexts[cid] = ctx
            contexts.move_to_end(cid)
            while len(contexts) > MAX_CONTEXTS:
                contexts.popitem(last=False)
        logger.info("registered public context %s (%d bytes)", cid, len(body))
        return {"context_id": cid, "galois_keys": bool(ctx.has_galois_keys())}

    @app.post("/v1/infer/{cid}")
    async def infer(cid: str, request: Request, mode: str = "throughput") -> Any:
        from starlette.concurrency import run_in_threadpool

        body = await request.body()
        if mode not in MODES:
            return error(400, f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        ctx = contexts.get(cid)
        if ctx is None:
            return error(404, f"unknown context {cid!r}: POST the public context first")
        if mode == "latency" and not ctx.has_galois_keys():
            return error(400, "the latency packing needs Galois keys in the public context")
        try:
            blobs = unpack_blobs(body)

            def work() -> Any:
                with lock:
                    return evaluate(ctx, plan, blobs, mode)

            out, stats = await run_in_threadpool(work)
        except ModelShieldError as exc:
            return error(400, str(exc))
        logger.info("%s request: %d ciphertexts in %.3f s", mode, len(blobs), stats.seconds)
        return Response(
            pack_blobs(out),
            media_type="application/octet-stream",
            headers={"X-HE-Server-Seconds": f"{stats.seconds:.6f}", "X-HE-Mode": mode},
        )

    return app
