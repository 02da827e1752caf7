"""Which SGLang releases the client speaks, and how they differ (read from SGLang's own
http_server.py and scheduler weight updater of each release).

    protocol = protocol_for("0.5.23", url)      # -> Protocol(weight_update_session=True, ...)

Supported: 0.5.9 to 0.5.23 (post releases included). What differs between them:
  * 0.5.21 and later hold tensor and distributed weight loads (/update_weights_from_tensor,
    /update_weights_from_distributed) to a weight-update session: POST /begin_weight_update
    {selector} before the first load and /end_weight_update {} after the last; a load outside
    one answers HTTP 400 ("... must run between begin_weight_update() and end_weight_update()").
    Disk loads need no session. Only one session can be open at a time.
  * /get_weight_version answers 404 in every supported release (a deprecation stub up to
    0.5.20, gone from 0.5.21): the weight version is read from /model_info in all of them.
  * /generate takes the same fields in all of them (rid: a string or a list; sampling_params:
    an object or a list), and prefill (input) log-probs ignore the sampling temperature in all.
A release outside that range, or a version string that is not a release (a source build
reports 0.0.0.dev0), is refused with an error naming the server and the version; set
``rollout.sglang_version`` to the release whose protocol such a server speaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gopd_mega.rollout.http import SGLangError

OLDEST, NEWEST = (0, 5, 9), (0, 5, 23)
SESSION_FROM = (0, 5, 21)
SUPPORTED = "0.5.9 to 0.5.23"


@dataclass(frozen=True)
class Protocol:
    """What one server's release needs from the client."""

    version: str
    weight_update_session: bool
    """Tensor and distributed loads must sit between /begin_weight_update and /end_weight_update."""
    model_info_path: str = "/model_info"
    """Where the weight version is read."""


def parse_version(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a release string such as '0.5.23' or '0.5.15.post1'; None for
    anything else (dev builds, 'standin', garbage)."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(?:\.?post\d+)?", str(version).strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def protocol_for(version: str, url: str) -> Protocol:
    """The protocol of a server at ``url`` that reports ``version`` (see the module docstring)."""
    v = parse_version(version)
    if v is None or not OLDEST <= v <= NEWEST:
        raise SGLangError(
            f"SGLang {url} reports version {version!r}, whose protocol this client does not know "
            f"(supported: {SUPPORTED}); upgrade or downgrade that server, or set rollout.sglang_version "
            f"to the supported release whose protocol it speaks"
        )
    return Protocol(version=str(version), weight_update_session=v >= SESSION_FROM)
