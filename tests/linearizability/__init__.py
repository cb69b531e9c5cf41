"""Linearizability checking of recorded client histories of the coordinators' test register map.

Record with ``Recorder`` (``history.py``), check with ``check`` (``checker.py``) against ``KV_REGISTER``
(``models.py``)::

    rec = Recorder()
    op = rec.invoke("client-1", "cas", b"k", expected=b"1", value=b"2")
    try:
        response = await stub.CompareAndSet(request, timeout=1)
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
            rec.fail_definite(op)        # certainly not applied
        else:
            rec.fail_unknown(op)         # DEADLINE_EXCEEDED, UNAVAILABLE, ...: maybe applied, maybe later
    else:
        rec.complete_response(op, response)  # or rec.complete(op, True, previous=b"1")
    ...
    result = check(rec.history(), timeout=30)
    assert result.ok, result.explain()   # on failure: rec.history().save(path), replay with History.load
"""

from .checker import CheckResult, Explanation, Outcome, Stuck, check
from .history import NOT_REPORTED, History, HistoryError, Operation, OpKind, Recorder, show
from .models import KV_REGISTER, KvRegister, Model

__all__ = [
    "KV_REGISTER",
    "NOT_REPORTED",
    "CheckResult",
    "Explanation",
    "History",
    "HistoryError",
    "KvRegister",
    "Model",
    "OpKind",
    "Operation",
    "Outcome",
    "Recorder",
    "Stuck",
    "check",
    "show",
]
