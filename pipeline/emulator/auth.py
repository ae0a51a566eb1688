"""Authentication as Google's endpoint answers it: the three key styles of the wild
(``x-goog-api-key`` or ``?key=``, ``Authorization: Bearer``, a raw ``Authorization``), and
Google's own error bodies for a missing, wrong, or leaked key and a refused style."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from pipeline.emulator.checks import ApiFault
from pipeline.emulator.options import EmulatorOptions


def presented(request: Request) -> tuple[str | None, str | None]:
    """(style, key) the client used, or (None, None)."""
    if key := request.headers.get("x-goog-api-key"):
        return "google", key
    if key := request.query_params.get("key"):
        return "google", key
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, rest = auth.partition(" ")
        if scheme.lower() == "bearer" and rest:
            return "bearer", rest.strip()
        return "raw", auth.strip()
    return None, None


def authorise(request: Request, options: EmulatorOptions) -> None:
    """Check the key the request presents, as Google does."""
    style, key = presented(request)
    expected = options.api_key
    if key is not None and key in options.revoked_keys:
        raise ApiFault(403, "PERMISSION_DENIED",
                       "Your API key was reported as leaked. Please use another API key.")
    if expected is None:
        return
    if style is None or key is None:
        raise ApiFault(403, "PERMISSION_DENIED",
                       "Method doesn't allow unregistered callers (callers without "
                       "established identity). Please use API Key or other form of API "
                       "consumer identity to call this API.")
    if options.auth not in ("any", style):
        raise ApiFault(401, "UNAUTHENTICATED",
                       "Request had invalid authentication credentials. Expected OAuth 2 "
                       "access token, login cookie or other valid authentication "
                       f"credential (this server takes '{options.auth}' keys, got "
                       f"'{style}').")
    if not hmac.compare_digest(key.encode(), expected.encode()):
        message = "API key not valid. Please pass a valid API key."
        raise ApiFault(400, "INVALID_ARGUMENT", message, [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com",
             "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
             "message": message}])
