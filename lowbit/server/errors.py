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
    """A 400 from pydantic's validation errors: the first one, and how many more there are."""
    message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})"
    return APIError(400, message, param=param)


def _validation_message(err: dict) -> tuple[str, str | None]:
    """One pydantic error as (message, param)."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({ctx}); send a JSON object", None
    if err.get("type") == "missing" and not loc:
        return "the request has no body; send a JSON object", None
    param = ".".join(loc) or None
    got = err.get("input")
    got_text = "" if err.get("type") in ("missing", "extra_forbidden") else f", got {got!r:.80}"
    if err.get("type") == "extra_forbidden":
        return f"unrecognized request argument {param!r}; remove it", param
    where = f"{param}: " if param else ""
    return f"{where}{err.get('msg', 'invalid value')}{got_text}", param


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
