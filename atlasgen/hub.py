"""A quick look at the Hugging Face hub before `datasets` / `transformers` try it, so an unreachable hub,
a wrong name or a gated repository is one clear line within seconds instead of minutes of retries."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

from .errors import AtlasError

PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "true", "yes", "on")


def offline_mode(*env_names: str) -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", *env_names))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe(kind: str, repo_id: str, what: str, error_cls: type[AtlasError], unreachable_hint: str,
          missing_hint: str, gated_hint: str) -> None:
    """HEAD `{endpoint}/api/{kind}/{repo_id}`; raise `error_cls` when the hub cannot be reached (with
    `unreachable_hint`), the repository does not exist (404) or is gated/private (401/403). Any other
    answer means the hub is there: the library itself then takes over."""
    assert kind in ("models", "datasets"), f"unknown hub kind {kind}"
    request = urllib.request.Request(f"{endpoint()}/api/{kind}/{repo_id}", method="HEAD")
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise error_cls(f"the Hugging Face {what} {repo_id} does not exist (or is private)", missing_hint) from None
        if e.code in (401, 403):
            raise error_cls(f"the Hugging Face {what} {repo_id} is gated or private (HTTP {e.code})",
                            gated_hint) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise error_cls(f"could not fetch the Hugging Face {what} {repo_id}: cannot reach {endpoint()} ({reason})",
                        unreachable_hint) from None
