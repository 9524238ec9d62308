"""`nebula status [--json] [--watch [--interval S]]`: the cluster at a glance, once or redrawn live."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

from nebula.cli.client import EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, AdminClient, CliError
from nebula.cli.views import status_frame, status_problems

# Clear the screen and move home; redrawing from home (not scrolling) keeps the frame in place.
CLEAR = "\x1b[H\x1b[2J"


def fetch(client: AdminClient) -> tuple[dict[str, Any] | None, str | None]:
    """(status, None), or (None, why) when the gateway did not answer; other errors propagate."""
    try:
        return client.call("GET", "/v1/admin/status"), None
    except CliError as e:
        if e.code != EXIT_UNREACHABLE:
            raise
        return None, str(e)


def status(client: AdminClient, *, as_json: bool, out: TextIO) -> int:
    """Exit 0 when healthy, 1 when something needs attention (listed under PROBLEMS), 5 with no gateway."""
    data, error = fetch(client)
    if data is None:
        if as_json:
            raise CliError(error or "no answer", EXIT_UNREACHABLE)
        print(status_frame(None, url=client.base, error=error), file=out)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True), file=out)
    else:
        print(status_frame(data, url=client.base), file=out)
    return EXIT_FAILURE if status_problems(data) else EXIT_OK


def watch(client: AdminClient, *, interval_s: float, out: TextIO, sleep: Callable[[float], None] = time.sleep,
          frames: int | None = None) -> int:
    """Redraw every `interval_s` until Ctrl-C (exit 0). On a terminal the frame replaces the last one;
    piped, each frame is printed in turn. An unreachable gateway is shown, not fatal: it may come back."""
    tty = out.isatty()
    drawn = 0
    try:
        while frames is None or drawn < frames:
            data, error = fetch(client)
            title = (f"nebula status  {time.strftime('%H:%M:%S')}  every {interval_s:g}s"
                     + ("  (Ctrl-C to quit)" if tty else ""))
            width = shutil.get_terminal_size().columns if tty else None
            frame = status_frame(data, url=client.base, error=error, title=title, width=width)
            out.write((CLEAR + frame + "\n") if tty else (frame + "\n\n"))
            out.flush()
            drawn += 1
            if frames is None or drawn < frames:
                sleep(interval_s)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
    return EXIT_OK
