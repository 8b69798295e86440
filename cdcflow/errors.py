"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing prerequisite, stack not running)."""


class ConfigError(UserError):
    """One or more configuration problems, each with file, key path and reason."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        first = problems[0]
        more = f" (and {len(problems) - 1} more problems; run `cdcflow validate`)" if len(problems) > 1 else ""
        super().__init__(f"{first}{more}")


class ConfigProblem:
    __slots__ = ("file", "path", "reason")

    def __init__(self, file: str, path: str, reason: str):
        self.file, self.path, self.reason = file, path, reason

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.reason}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self})"


def environment_problem(exc: BaseException) -> str | None:
    """One line for an error that says a service or path the user named isn't there (the AWS endpoint,
    the warehouse, a folder), or None for anything else (a bug keeps its traceback). Looks the
    libraries' error classes up only when the command imported them, so this stays cheap."""
    import sys
    from urllib.parse import urlparse

    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        if isinstance(exc, botocore.EndpointConnectionError):
            url = urlparse(exc.kwargs.get("endpoint_url", ""))
            endpoint = f"{url.scheme}://{url.netloc}" if url.netloc else exc.kwargs.get("endpoint_url", "?")
            return f"cannot reach the AWS endpoint {endpoint} (aws.endpoint_url){_stack_hint(url.hostname)}"
        if isinstance(exc, botocore.NoCredentialsError):
            return "no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or run with a role)"
        if isinstance(exc, botocore.ClientError) and exc.response.get("Error", {}).get("Code") in _AWS_SETUP_CODES:
            error = exc.response["Error"]
            return f"AWS {exc.operation_name}: {error['Code']}: {error.get('Message') or 'refused'}"
    psycopg, redshift = sys.modules.get("psycopg"), sys.modules.get("redshift_connector")
    if (psycopg is not None and isinstance(exc, psycopg.OperationalError)) or (
            redshift is not None and isinstance(exc, redshift.InterfaceError)):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        local = any(h in first for h in ("127.0.0.1", "localhost", "/run/postgresql", "/tmp/.s.PGSQL"))
        return f"warehouse: {first} (warehouse.url){_stack_hint('localhost' if local else None)}"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return None


# AWS refusals that mean a resource the config names is missing or the credentials can't use it (the
# user's to fix); any other ClientError keeps its traceback.
_AWS_SETUP_CODES = {"NoSuchBucket", "AccessDenied", "AccessDeniedException", "ResourceNotFoundException",
                    "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "UnrecognizedClientException", "InvalidClientTokenId"}


def _stack_hint(host: str | None) -> str:
    """On this machine, the usual cause is the embedded stack not running."""
    return "; is the local stack running? start it with `cdcflow local up`" if host in (
        "127.0.0.1", "localhost", "::1") else ""
