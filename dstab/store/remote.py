"""Object stores: a quick look at a remote URL before dstab opens or writes it, and one line saying why it failed.

Left to themselves, fsspec and botocore answer a dead endpoint after many
seconds of retries with a multi-page traceback, and zarr reports an
unreachable store as "not a Zarr group". :func:`probe` asks the store about
the URL once, with short timeouts and a bounded number of retries, before
any group is opened or any cluster starts, and :func:`storage_error` turns
whatever went wrong into a :class:`~dstab.errors.StorageError` whose message
names the URL, the cause and the fix, on one line.

The probe's timeouts are defaults laid under the caller's storage options
(the caller's own values win) and are used for the probe only: zarr and the
workers get the storage options exactly as given. Nothing in the options
(credentials, endpoint) is ever put in a message.
"""

from __future__ import annotations

import copy
import errno
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .. import config
from ..errors import StorageError
from ..extras import install_hint

T = TypeVar("T")

# botocore settings for the probe of an s3:// URL, laid under the user's config_kwargs.
# Worst case (a silent endpoint): 3 attempts x 5 s + at most 3 s of back-off. (botocore's
# "max_attempts" counts retries, "total_max_attempts" the requests; it rewrites the dict it is given.)
S3_PROBE_CONFIG: dict[str, Any] = {
    "connect_timeout": 3,
    "read_timeout": 5,
    "retries": {"total_max_attempts": 3, "mode": "standard"},
}
S3_PROTOCOLS = ("s3", "s3a")
# Stores whose first path component is a bucket (or container) that must exist.
ROOT_KIND = {
    "s3": "bucket",
    "s3a": "bucket",
    "gs": "bucket",
    "gcs": "bucket",
    "az": "container",
    "abfs": "container",
    "abfss": "container",
}

_BARE_403 = {"403", "Forbidden", "AccessDenied"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
_MISSING_ROOT_CODES = {"NoSuchBucket", "ContainerNotFound", "NoSuchContainer"}
_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError", "ServerTimeoutError",
    "ClientOSError", "ServerDisconnectedError", "FSTimeoutError",
}  # fmt: skip
_CONNECTION_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
}
# The fsspec backend each protocol needs; extras.install_hint names the dstab extra that installs it (s3fs: dstab[cloud]).
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "http": "aiohttp",
    "https": "aiohttp",
}


class _MissingRoot(Exception):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.kind, self.name = kind, name


class _Deadline(Exception):
    pass


def protocol_of(url: str) -> str:
    from fsspec.utils import get_protocol

    return get_protocol(url)


def probe_deadline() -> float:
    """Wall-clock bound on the whole probe, for any store: dask config ``dstab.probe-timeout`` (25 s by default)."""
    return config.get("probe-timeout")


def _copy(options: dict[str, Any]) -> dict[str, Any]:
    """A copy botocore may rewrite (it edits config_kwargs["retries"] in place); shallow if some value cannot be copied."""
    try:
        return copy.deepcopy(options)
    except Exception:  # noqa: BLE001 - e.g. a session object passed through the Python API
        return {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}


def probe_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options the probe uses: the user's, with short timeouts and bounded retries beneath them (s3 only)."""
    options = _copy(dict(storage_options or {}))
    if protocol_of(url) in S3_PROTOCOLS and "::" not in url:
        user = options.get("config_kwargs") or {}
        merged = {**copy.deepcopy(S3_PROBE_CONFIG), **user}
        if isinstance(user.get("retries"), dict):
            retries = {**S3_PROBE_CONFIG["retries"], **user["retries"]}
            if "max_attempts" in user["retries"] and "total_max_attempts" not in user["retries"]:
                retries.pop("total_max_attempts")  # the user's count of retries wins
            merged["retries"] = retries
        options["config_kwargs"] = merged
    return options


def probe(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    what: str = "version",
    output: bool = False,
) -> bool:
    """True if something is stored at ``url``, False if nothing is (but its bucket exists).

    Raises :class:`StorageError` (one line: the URL, the cause, the fix) when
    the store cannot be reached, refuses the credentials, or has no such
    bucket; answers within :func:`probe_deadline` seconds whatever the store does.
    """
    options = probe_options(url, storage_options)
    protocol = protocol_of(url)

    def look() -> bool:
        import fsspec

        # a private instance: the short timeouts and single s3fs-level try never reach zarr's
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **_copy(options))
        if protocol in S3_PROTOCOLS and hasattr(fs, "retries"):
            fs.retries = 1  # botocore's own retries (above) are the bounded ones
        return _look(fs, path.rstrip("/"), protocol)

    try:
        return _bounded(look, probe_deadline())
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise storage_error(url, exc, options, what=what, output=output) from None


def _look(fs: Any, path: str, protocol: str) -> bool:
    try:
        fs.info(path)
        return True
    except FileNotFoundError as missing:
        if _unreachable(missing):
            raise  # fsspec's HTTP filesystem reports a refused connection as "not found"
        kind = ROOT_KIND.get(protocol)
        if kind:
            root = path.split("/", 1)[0]
            if root == path or _codes(missing) & _MISSING_ROOT_CODES or not _root_exists(fs, root):
                raise _MissingRoot(kind, root) from None
        return False
    except PermissionError as denied:
        # S3 answers a HEAD with a bare 403 (no body): a listing says whether the key, the secret or the
        # permissions are at fault (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied)
        if _codes(denied) <= _BARE_403:
            better: Exception | None
            try:
                fs.ls(path, detail=False)
            except Exception as listing:  # noqa: BLE001 - only its error codes are used
                better = listing
            else:
                better = None
            if better is not None and _codes(better) & _CREDENTIAL_CODES:
                raise better  # noqa: B904 - its __cause__ is the store's answer: "from ..." would replace it
        raise


def _unreachable(exc: BaseException) -> bool:
    chain = _chain(exc)
    return bool(
        _names(chain) & _CONNECTION_ERRORS
        or _errnos(chain) & _CONNECTION_ERRNOS
        or any(isinstance(e, (TimeoutError, socket.gaierror)) for e in chain)
    )


def _root_exists(fs: Any, root: str) -> bool:
    try:
        fs.info(root)
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - cannot tell (e.g. no permission on the bucket itself): the key's answer stands
        return True
    return True


def _bounded(fn: Callable[[], T], seconds: float) -> T:
    """``fn()`` in a daemon thread; :class:`_Deadline` if it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="dstab-store-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _Deadline(seconds)
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----------------------------------------------------------------------------- classifying errors

_STORE_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "s3fs",
    "fsspec",
    "gcsfs",
    "google",
    "adlfs",
    "azure",
    "requests",
    "urllib3",
)


def is_store_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from talking to a store (an OSError, or an error of the client libraries), not from a bug."""
    return any(isinstance(e, OSError) or type(e).__module__.split(".")[0] in _STORE_MODULES for e in _chain(exc))


def storage_error(
    url: str,
    exc: BaseException,
    storage_options: dict[str, Any] | None = None,
    *,
    what: str = "version",
    output: bool = False,
) -> StorageError:
    """One-line :class:`StorageError` for ``exc``, raised while reading (or checking the output) ``url``."""
    options = storage_options or {}
    head = f"cannot write {url}" if output else f"cannot open {what} {url}"
    cause, fix = _explain(url, exc, options, output)
    return StorageError(" ".join(f"{head}: {cause}; {fix}".split()))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it: causes, contexts, and the errors botocore and aiohttp keep aside."""
    seen: set[int] = set()
    out: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        kwargs = getattr(e, "kwargs", None)
        todo += [
            e.__cause__,
            e.__context__,
            getattr(e, "os_error", None),
            kwargs.get("error") if isinstance(kwargs, dict) else None,
        ]
    return out


def _names(chain: list[BaseException]) -> set[str]:
    return {cls.__name__ for e in chain for cls in type(e).__mro__}


def _codes(exc: BaseException) -> set[str]:
    """Error codes of the store's answers behind ``exc`` (botocore ClientError), e.g. {"NoSuchBucket"}."""
    codes = set()
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                codes.add(str(code))
    return codes


def _errnos(chain: list[BaseException]) -> set[int]:
    return {e.errno for e in chain if isinstance(e, OSError) and isinstance(e.errno, int)}


def _has_endpoint(options: dict[str, Any]) -> bool:
    client = options.get("client_kwargs")
    return bool(options.get("endpoint_url") or (isinstance(client, dict) and client.get("endpoint_url")))


def _setting(options: dict[str, Any], name: str, default: Any) -> Any:
    config = options.get("config_kwargs")
    return config.get(name, default) if isinstance(config, dict) else default


def _secrets(value: Any) -> set[str]:
    """Every string in the storage options worth hiding (and the host of any URL among them)."""
    from urllib.parse import urlsplit

    found: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            found |= _secrets(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            found |= _secrets(v)
    elif isinstance(value, str) and len(value) >= 4:
        found.add(value)
        if "://" in value:
            parts = urlsplit(value)
            found |= {p for p in (parts.netloc, parts.hostname) if p and len(p) >= 4}
    return found


def _redact(text: str, options: dict[str, Any]) -> str:
    for secret in sorted(_secrets(options), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _explain(url: str, exc: BaseException, options: dict[str, Any], output: bool) -> tuple[str, str]:
    """(cause, fix), in words, for an error raised while probing or opening ``url``."""
    protocol = protocol_of(url)
    s3 = protocol in S3_PROTOCOLS
    endpoint = "the endpoint" if _has_endpoint(options) or not s3 else "the AWS S3 endpoint"
    check_endpoint = (
        "check endpoint_url in --storage-options"
        if _has_endpoint(options)
        else "check that the store is AWS S3 (else set endpoint_url in --storage-options)"
        if s3
        else "check the URL and --storage-options"
    )
    creds = "key and secret in --storage-options (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if isinstance(exc, _Deadline):
        return (
            f"no answer from the store within {exc.args[0]:g} s",
            f"{check_endpoint}; if the store is merely slow, raise DASK_DSTAB__PROBE_TIMEOUT",
        )
    if isinstance(exc, _MissingRoot):
        fix = f"check the {exc.kind} name in the URL" + (f", or create the {exc.kind} first" if output else "")
        return f"the {exc.kind} '{exc.name}' does not exist on this store", fix

    chain = _chain(exc)
    names = _names(chain)
    codes = _codes(exc)
    numbers = _errnos(chain)
    retries = (_setting(options, "retries", None) or {}) if s3 else {}
    attempts = retries.get("total_max_attempts") or (retries["max_attempts"] + 1 if "max_attempts" in retries else None)
    tries = f", {attempts} attempts" if attempts else ""  # inside a parenthesis that names the cause

    if codes & _MISSING_ROOT_CODES:
        kind = ROOT_KIND.get(protocol, "bucket")
        root = url.split("://", 1)[-1].split("/", 1)[0]
        return (
            f"the {kind} '{root}' does not exist on this store",
            f"check the {kind} name in the URL" + (f", or create the {kind} first" if output else ""),
        )
    if "NoCredentialsError" in names:
        return (
            "no credentials found (none in --storage-options, in the AWS_* environment, in ~/.aws, or from an instance role)",
            'pass "key" and "secret" in --storage-options, or {"anon": true} for a public bucket',
        )
    if "PartialCredentialsError" in names:
        return (
            "incomplete credentials (a key without a secret, or the reverse)",
            f"give both {creds}",
        )
    if "CredentialRetrievalError" in names:
        return (
            "the credential provider failed",
            "check the AWS profile, role or credential process, or pass key and secret in --storage-options",
        )
    if "InvalidAccessKeyId" in codes:
        return (
            "the store does not know the access key id (InvalidAccessKeyId)",
            f"check the {creds}",
        )
    if "SignatureDoesNotMatch" in codes:
        return (
            "the secret does not match the access key id (SignatureDoesNotMatch)",
            f"check the {creds}",
        )
    if codes & {"ExpiredToken", "InvalidToken", "TokenRefreshRequired"}:
        code = min(codes & {"ExpiredToken", "InvalidToken", "TokenRefreshRequired"})
        return (
            f"the session token has expired or is invalid ({code})",
            "refresh the credentials (token in --storage-options)",
        )
    if "RequestTimeTooSkewed" in codes:
        return (
            "this machine's clock differs too much from the store's (RequestTimeTooSkewed)",
            "synchronise the clock (NTP)",
        )
    if codes & {
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
        "301",
    }:
        return (
            f"the bucket is in another region ({min(codes)})",
            'set the region in --storage-options, e.g. "client_kwargs": {"region_name": "eu-west-1"}',
        )
    if codes & _BARE_403 or "PermissionError" in names and not codes:
        need = "write" if output else "read"
        return (
            (
                f"access denied ({min(codes) if codes else 'permission denied'}): the credentials may not {need} it "
                "(S3 also answers so for a missing key when they may not list the bucket)"
            ),
            f"check the URL and what the credentials may do (e.g. s3:GetObject, s3:ListBucket{', s3:PutObject' if output else ''})",
        )
    if codes & {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "500",
        "502",
        "503",
        "504",
    }:
        return f"the store keeps failing ({min(codes)}{tries})", "try again later"
    if "ConnectTimeoutError" in names:
        seconds = _setting(options, "connect_timeout", None)
        within = f" within {seconds:g} s" if isinstance(seconds, (int, float)) else ""
        return (
            f"no answer from {endpoint}{within} (connect timeout{tries})",
            f"{check_endpoint}, the network and any firewall",
        )
    if names & {"ReadTimeoutError", "ServerTimeoutError", "FSTimeoutError"} or any(
        isinstance(e, (TimeoutError, socket.timeout)) for e in chain
    ):
        seconds = _setting(options, "read_timeout", None)
        within = f" within {seconds:g} s" if isinstance(seconds, (int, float)) else ""
        return (
            f"{endpoint} accepted the connection but did not answer{within} (read timeout{tries})",
            f"{check_endpoint} (it must point at the store's service, not another one), and that the store is healthy",
        )
    if any(isinstance(e, socket.gaierror) for e in chain) or "ClientConnectorDNSError" in names:
        return (
            f"the host name of {endpoint} does not resolve",
            f"{check_endpoint} (a typo in the host name?), and DNS",
        )
    if errno.ECONNREFUSED in numbers or "ConnectionRefusedError" in names:
        return (
            f"connection refused by {endpoint} (nothing listens at that host and port{tries})",
            (f"{check_endpoint}, and that the store is running"),
        )
    if numbers & {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN}:
        return (
            f"{endpoint} is unreachable from this machine (no route to it{tries})",
            f"{check_endpoint}, the network, VPN or proxy",
        )
    if names & {"SSLError", "ClientSSLError", "SSLCertVerificationError"}:
        return f"the TLS handshake with {endpoint} failed", (
            f"{check_endpoint} (http:// for a server without TLS), or the certificate (client_kwargs.verify)"
        )
    if names & {
        "EndpointConnectionError",
        "ClientConnectorError",
        "ConnectionError",
        "ProxyConnectionError",
    }:
        return (
            f"cannot connect to {endpoint} ({type(exc).__name__}{tries})",
            f"{check_endpoint}, the network and any proxy",
        )
    if isinstance(exc, ImportError):
        package = _PACKAGES.get(protocol)
        needs = (
            f"{protocol}:// URLs need {package}, which is not installed"
            if package
            else f"a package for {protocol}:// URLs is missing"
        )
        return (
            f"{needs} ({_redact(str(exc), options)})",
            install_hint(package) if package else "pip install the package it names",
        )
    if isinstance(exc, ValueError) and "protocol" in str(exc).lower():
        return (
            f"{protocol}:// is not a storage protocol fsspec knows",
            "use a local path or a URL like s3://bucket/path",
        )
    if isinstance(exc, TypeError) and "argument" in str(exc):
        return (
            f"--storage-options holds an option the store does not take ({_redact(str(exc).splitlines()[0], options)})",
            "check the option names against the filesystem's documentation (e.g. s3fs.S3FileSystem)",
        )
    if codes:
        return (
            f"the store answered {min(codes)}",
            "check the URL, --storage-options and the store",
        )
    text = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "", options)
    return (
        f"{type(exc).__name__}{': ' + text if text else ''}",
        "check the URL, --storage-options and the network",
    )
