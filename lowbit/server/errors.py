"""OpenAI's error JSON for every failure, and the exception handlers that produce it."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status; clients (the openai package) map the status to an exception.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}
# Engine field names that users know under OpenAI's name.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """A failure to report to the client as OpenAI's error JSON."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`."""
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        """The JSON response with this error's status."""
        return JSONResponse(self.body(), status_code=self.status)

    def sse(self) -> str:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(exc: Exception) -> APIError:
    """A 400 from an engine ValueError/TypeError; `param` is the field its message names."""
    msg = str(exc)
    head = msg.split("=", 1)[0].split(" ", 1)[0]
    param = _PARAM_NAMES.get(head, head) if head.isidentifier() and "=" in msg else None
    return APIError(400, msg, param=param)


def invalid(errors: list[dict]) -> APIError:
    """A 400 from pydantic's validation errors: the first field's problem, and how many more."""
    if not errors:
        return APIError(400, "invalid request")
    fields: dict = {}
    for err in errors:  # a union reports one error per member; group them by top-level field
        fields.setdefault(_field_loc(err)[:1], []).append(err)
    errs = next(iter(fields.values()))
    # The member that got deepest into the value says the most (e.g. input_ids.1.0: must be ≥ 0).
    best = max(errs, key=lambda e: len(_field_loc(e)))
    loc = _field_loc(best)
    message, param = _validation_message(best, loc)
    if len(errs) > 1 and len(loc) <= 1:
        tags = [e["loc"][1] for e in errs if len(e["loc"]) > 1 and _is_type_tag(e["loc"][1])]
        kinds = [t.replace("constrained-", "") for t in tags]
        message = f"{param}: {best.get('input')!r:.80} is not one of the accepted types"
        message += f" ({', '.join(dict.fromkeys(kinds))})" if kinds else ""
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more problem{'s' * (len(fields) > 2)})"
    return APIError(400, message, param=param)


_SCALARS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_type_tag(part) -> bool:
    """Whether a loc element names a union member (`list[int]`, `str`, `TextPart`), not a field."""
    if not isinstance(part, str):
        return False
    return part in _SCALARS or "[" in part or "-" in part or part[:1].isupper()


def _field_loc(err: dict) -> tuple:
    """The loc of the field an error is about, without "body" and union member tags."""
    loc = [p for p in err.get("loc", ()) if p != "body"]
    while loc and _is_type_tag(loc[-1]):
        loc.pop()
    return tuple(p for p in loc if not _is_type_tag(p))


def _validation_message(err: dict, loc: tuple) -> tuple[str, str | None]:
    """One pydantic error as (message, param)."""
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({ctx}); send a JSON object", None
    param = ".".join(str(p) for p in loc) or None
    if err.get("type") == "missing":
        return f"{param} is required", param
    if err.get("type") == "extra_forbidden":
        return f"unrecognized request argument {param!r}; remove it", param
    where = f"{param}: " if param else ""
    return f"{where}{err.get('msg', 'invalid value')}, got {err.get('input')!r:.80}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, leaves as OpenAI's error JSON."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the routes"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        if not isinstance(detail, str):
            detail = HTTPStatus(exc.status_code).phrase
        return APIError(exc.status_code, detail).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
