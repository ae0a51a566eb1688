"""What an error answer means: Google's error bodies (RetryInfo, QuotaFailure, ErrorInfo) and
gateways' OpenAI-shaped ones read once (:class:`ErrorBody`), and each answer converted to the
:mod:`pipeline.errors` error that says what to do (:func:`error_for`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.errors import (
    AccessError,
    BalanceExhausted,
    EmbedError,
    QuotaExhausted,
    TerminalEmbedError,
    TransientEmbedError,
)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)
# ErrorInfo reasons Google gives a 400 that is about the key, not the request's content.
# new-api's codes for a balance or token quota that is used up (its docs and source), and the
# Chinese sentences older versions answer instead ("额度不足": quota insufficient, "额度已用尽":
# quota used up).
BALANCE_CODES = frozenset({"insufficient_user_quota", "insufficient_quota",
                           "pre_consume_token_quota_failed", "quota_exceeded"})
_BALANCE_WORDS = re.compile(r"额度(不足|已用尽)|insufficient (user )?(quota|balance)|"
                            r"balance (is )?(exhausted|insufficient|not enough)", re.IGNORECASE)
_NO_CHANNEL = re.compile(r"no available channel|无可用渠道", re.IGNORECASE)
_PER_DAY = re.compile(r"per[ _-]?day", re.IGNORECASE)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED",
                         "API_KEY_HTTP_REFERRER_BLOCKED", "API_KEY_IP_ADDRESS_BLOCKED",
                         "API_KEY_ANDROID_APP_BLOCKED", "API_KEY_IOS_APP_BLOCKED"})


def html_page(raw: bytes) -> str:
    """An HTML body in a few words: its title (a gateway's or a proxy's error page)."""
    m = _TITLE.search(raw[:65536])
    title = " ".join(m.group(1).decode("utf-8", "replace").split())[:120] if m else ""
    return f"an HTML page ({title})" if title else f"an HTML page ({len(raw):,} bytes)"


def _access_message(base: str, model: str, code: int, body: ErrorBody, message: str) -> str:
    """One line: what the API said, where, for which model, and what to check."""
    if body.gateway:  # a gateway's own answer: Google's project settings are not the point
        if code == 404:
            check = ("embed.model, and embed.base_url: the gateway's Gemini-compatible base, "
                     "without /v1beta")
        elif code == 401:
            check = ("the gateway token in embed.api_key (set, current, not used up?) and "
                     "embed.auth: bearer, raw or google, as the gateway's docs say")
        else:
            check = ("the gateway token's permissions (its group must include the model; a "
                     "key of the form sk-KEY-N asks for channel N, which only admins may)")
    elif code == 404:
        check = ("embed.model, and embed.base_url / embed.api_version if a gateway serves "
                 "the API under another path")
    elif code == 401 or body.about_key:
        check = ("embed.api_key (is it set, current, and a key of a project with the "
                 "Generative Language API enabled?) and embed.auth")
    else:
        check = ("the key's permissions: its project must have access to the model, the "
                 "key must not be restricted, suspended or reported as leaked")
    return f"{message} (endpoint {base}, model {model}: check {check})"


def _retry_in(message: str) -> float | None:
    """The delay in a message's "Please retry in 33.384105706s" (or "...ms")."""
    m = _RETRY_IN.search(message)
    return float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1) if m else None


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error body says, read once, in Google's shape (status, message, and the details
    that decide what to do: RetryInfo, every QuotaFailure violation, ErrorInfo reasons) or a
    gateway's OpenAI shape (message, type, code), or a body that is no JSON (an HTML page is
    shortened to its title)."""

    status: str | None = None
    message: str = ""
    retry_delay_s: float | None = None
    quota_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    gateway: bool = False  # OpenAI-shaped: a gateway answered, not Google
    code: str = ""  # a gateway's error.code ("insufficient_user_quota", "429", ...)

    @property
    def per_day_quota(self) -> str | None:
        """The first per-day violation: any of them means no retry helps today. A gateway
        drops the violations; their metric is then read from the message."""
        found = next((q for q in self.quota_ids if "perday" in q.lower()), None)
        if found is None and self.gateway and _PER_DAY.search(self.message):
            return "PerDay (from the message)"
        return found

    @property
    def about_key(self) -> bool:
        return bool(KEY_REASONS.intersection(self.reasons)) or \
            self.message.lower().startswith(("api key not valid", "api key expired"))

    @property
    def balance_exhausted(self) -> bool:
        return self.code in BALANCE_CODES or (self.gateway and bool(
            _BALANCE_WORDS.search(self.message)))

    @property
    def no_channel(self) -> bool:
        return self.code == "model_not_found" or bool(_NO_CHANNEL.search(self.message))

    @classmethod
    def parse(cls, raw: bytes) -> ErrorBody:
        try:
            err = orjson.loads(raw).get("error", {})
            if isinstance(err, str):  # {"error": "..."}: some proxies
                return cls(message=err[:300], gateway=True)
            delay = None
            quota_ids: list[str] = []
            reasons: list[str] = []
            for detail in err.get("details") or []:
                kind = str(detail.get("@type", ""))
                if kind.endswith("RetryInfo"):
                    m = _DURATION.match(str(detail.get("retryDelay", "")))
                    delay = float(m.group(1)) if m else None
                elif kind.endswith("QuotaFailure"):
                    quota_ids += [str(v["quotaId"]) for v in detail.get("violations") or []
                                  if v.get("quotaId")]
                elif kind.endswith("ErrorInfo") and detail.get("reason"):
                    reasons.append(str(detail["reason"]))
            gateway = "type" in err and "status" not in err
            code = err.get("code")
            return cls(err.get("status"), str(err.get("message", "")), delay, tuple(quota_ids),
                       tuple(reasons), gateway,
                       "" if code is None or (isinstance(code, int) and not gateway) else str(code))
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
            if raw.lstrip()[:1] == b"<":
                return cls(message=html_page(raw), gateway=True)
            text = " ".join(raw[:300].decode("utf-8", "replace").split())
            return cls(message=text)


def error_for(code: int, raw: bytes, retry_after: str | None, *, base: str, model: str,
              scrub: Callable[[str], str]) -> EmbedError:
    """An answer other than 200 as the :mod:`pipeline.errors` error that says what to do."""
    body = ErrorBody.parse(raw)
    delays = [d for d in (body.retry_delay_s, _retry_in(body.message),
                          float(retry_after) if retry_after and retry_after.strip().isdigit()
                          else None) if d is not None]
    message = scrub(body.message or f"HTTP {code}")
    kwargs: dict[str, Any] = {"http_status": code, "status": body.status,
                              "retry_after_s": max(delays) if delays else None,
                              "quota_id": body.per_day_quota or (body.quota_ids[-1]
                                                                 if body.quota_ids else None)}
    if body.balance_exhausted or code == 402:
        return BalanceExhausted(message, **kwargs)
    if code == 429 and body.per_day_quota:
        return QuotaExhausted(message, **kwargs)
    if body.no_channel:
        return AccessError(f"{message} (endpoint {base}: the gateway has no channel "
                           f"serving model {model}: check embed.model against the "
                           "models the gateway lists, or ask its operator)", **kwargs)
    if code in TRANSIENT_STATUS:
        return TransientEmbedError(message, **kwargs)
    if code in (401, 403, 404) or (code == 400 and body.about_key):
        return AccessError(_access_message(base, model, code, body, message),
                           **kwargs)
    return TerminalEmbedError(message, **kwargs)
