"""Where a study's trials run: Ray started in-process, or a running Ray cluster joined with its token.

A cluster started on its own (``ray start --head`` / ``ray up``) with token authentication checks a shared token on
every connection. Ray turns token mode on by itself only for a local cluster it finds with ``address="auto"``; for
an explicit address the driver must be told, before ``ray`` is imported. :func:`ray_session` does that when it
finds a token where Ray documents (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``), and turns each way a connection fails into one line that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

AUTH_MODE = "RAY_AUTH_MODE"
VERBOSE_ENV = "ABD_RAY_VERBOSE"  # "1": Ray's own console output in the driver and a local Ray's workers (`-v`)
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
# What Ray's GCS client logs when the cluster refuses the token it sent (or the lack of one).
_REFUSED_MARKS = ("Authentication token is missing or incorrect", "UNAUTHENTICATED")
_PROBE_TIMEOUT_S = 5.0


class ClusterError(ValueError):
    """The Ray cluster named by ``--address`` cannot be joined; the message says why and what to do."""


def token_source() -> str | None:
    """Where Ray would read the cluster token from, in Ray's own order of precedence, or None if nowhere.

    Raises:
        ClusterError: ``RAY_AUTH_TOKEN_PATH`` names a file that holds no token (Ray itself would abort).
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        path = Path(named).expanduser()
        if not _holds_token(path):
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={named} names no readable, non-empty token file; write the "
                               "cluster's token there (on the head, `ray get-auth-token` prints it) or unset it")
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    path = DEFAULT_TOKEN_FILE.expanduser()
    return str(path) if _holds_token(path) else None


def _holds_token(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS address, or None for addresses Ray resolves itself (``auto``, ``ray://``...)."""
    if address == "auto" or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379) or 'auto'")
    return host, int(port)


def _probe(address: str) -> None:
    """Fail in seconds, not after Ray's retries, when nothing listens at ``address``."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ClusterError(f"no Ray cluster answers at {address} ({reason}): check the address (`ray status` on "
                           f"the head prints it) or start a head there with `ray start --head --port {target[1]}`"
                           ) from None


@contextlib.contextmanager
def _stderr_to(sink: list[str]) -> Iterator[None]:
    """Send file descriptor 2 (Python's and Ray's C++ logging alike) to a buffer while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def _refusal(address: str, source: str | None, late: bool) -> ClusterError:
    fix = ("on the head, `ray get-auth-token` prints the cluster's token; export RAY_AUTH_TOKEN=<token> (or save "
           "it to ~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at a file that holds it) and run again")
    if os.environ.get(AUTH_MODE, "").lower() == "disabled":
        return ClusterError(f"the Ray cluster at {address} requires token authentication and {AUTH_MODE}=disabled "
                            f"is set here: unset it; {fix}")
    if late:
        return ClusterError(f"the Ray cluster at {address} refused this driver: a token was found ({source}) but ray "
                            f"was imported before token mode could be turned on; export {AUTH_MODE}=token before "
                            "starting Python")
    if source is None:
        return ClusterError(f"the Ray cluster at {address} requires its authentication token and none was found "
                            f"here: {fix}")
    return ClusterError(f"the Ray cluster at {address} refused the token from {source}: it is not this cluster's "
                        f"token; {fix}")


def _join(address: str, init_kwargs: dict[str, Any], echo: Callable[[str], None]) -> None:
    """``ray.init(address=...)`` with the token found here, its failures turned into :class:`ClusterError`."""
    _probe(address)
    source = token_source()
    late = False
    if source is not None and AUTH_MODE not in os.environ:
        late = "ray" in sys.modules  # Ray reads its auth mode once, at import: this process's client may miss it
        os.environ[AUTH_MODE] = "token"
    import ray
    from ray.exceptions import AuthenticationError

    echo(f"joining the Ray cluster at {address}" + (f" (token from {source})" if source else ""))
    captured: list[str] = []
    try:
        with _stderr_to(captured):
            ray.init(address=address, **init_kwargs)
    except AuthenticationError:
        raise _refusal(address, source, late) from None
    except ConnectionError as e:
        if any(mark in captured[0] for mark in _REFUSED_MARKS):
            raise _refusal(address, source, late) from None
        if address == "auto":
            raise ClusterError("--address auto found no running Ray cluster on this machine: start one with "
                               "`ray start --head`, or give the head's host:port") from None
        raise ClusterError(f"could not join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    sys.stderr.write(captured[0])
    res = ray.cluster_resources()
    echo(f"joined: {len([n for n in ray.nodes() if n['Alive']])} node(s), {res.get('CPU', 0):g} CPU(s), "
         f"{res.get('GPU', 0):g} GPU(s)")


def connect(address: str | None, echo: Callable[[str], None] = print) -> bool:
    """Start Ray in-process (all local CPUs and GPUs) or join ``address`` (else ``$RAY_ADDRESS``).

    Returns:
        Whether this call started or joined Ray (False: the caller had already initialised it).

    Raises:
        ClusterError: the cluster cannot be reached or refuses this driver (the message names the fix).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune snapshots the experiment whenever a trial has checkpointed num_to_keep times since the last snapshot,
    # which is what a resume needs; its warning about doing so often is noise with short evaluation intervals.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _join(address, init_kwargs, echo)
    else:
        import ray

        # "local": a new in-process cluster. With no address Ray would join the last `ray start` cluster named in
        # its temp dir, and wait on that address even when the cluster is long gone. Token authentication is left
        # as Ray sets it for a local cluster (on); no dashboard: on two cores it would compete with trials.
        ray.init(address="local", include_dashboard=False, **init_kwargs)
    return True


@contextlib.contextmanager
def ray_session(address: str | None, echo: Callable[[str], None] = print) -> Iterator[None]:
    """Ray for the length of the block: started or joined on entry, shut down on exit if this block began it."""
    started = connect(address, echo)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
