"""How an ``s3://`` artifact root is opened: endpoint, region and credentials.

Everything here is resolved in the process that opens the store: the run's
config and context (both recorded by Prefect) carry at most an endpoint and
the *name* of a credentials block, never a key. Credentials come
from a saved Prefect Secret block named by ``credentials_block`` (JSON
``{"key": ..., "secret": ...}``, optionally ``"token"``), else from botocore's
own chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role.
"""

from __future__ import annotations

import functools
import os
from typing import cast
from urllib.parse import urlsplit

ENDPOINT_ENV = "ALIGNFLOW_S3_ENDPOINT"
BLOCK_OPTION = "credentials_block"
S3_PROTOCOLS = ("s3", "s3a")
# fsspec/s3fs/botocore options that hold a credential: in a config they would be
# recorded with the flow run's parameters.
SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "username",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)


class StorageConfigError(ValueError):
    """An artifact root that cannot be opened as configured (retrying will not help)."""


def is_s3(root: str) -> bool:
    return urlsplit(root).scheme in S3_PROTOCOLS


def secret_option_names(options: dict) -> list[str]:
    """The credential-holding keys among fsspec options, nested client/config kwargs included."""
    found = [name for name in options if name.lower() in SECRET_OPTIONS]
    for nested in ("client_kwargs", "config_kwargs"):
        if isinstance(options.get(nested), dict):
            found += [f"{nested}.{name}" for name in secret_option_names(options[nested])]
    return found


def masked_credentials(options: dict) -> dict:
    """A copy with every credential value replaced by '***' (for error messages)."""
    masked = {k: "***" if k.lower() in SECRET_OPTIONS else v for k, v in options.items()}
    for nested in ("client_kwargs", "config_kwargs"):
        if isinstance(options.get(nested), dict):
            masked[nested] = masked_credentials(options[nested])
    return masked


def refuse_credentials_in_url(root: str) -> None:
    """``s3://KEY:SECRET@bucket`` works in fsspec, and the root is written into every manifest."""
    parts = urlsplit(root)
    if parts.username or parts.password:
        raise StorageConfigError(
            f"artifact root {parts.scheme}://***@{parts.hostname}{parts.path}: credentials in the URL would be "
            "recorded in every manifest; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.credentials_block"
        )


def open_options(root: str, options: dict) -> dict:
    """The fsspec options that open ``root``: for s3 roots, endpoint, region and credentials added."""
    if not is_s3(root):
        if options.get(BLOCK_OPTION):
            raise StorageConfigError(f"storage.{BLOCK_OPTION} is set but the artifact root {root} is not s3://")
        return {k: v for k, v in options.items() if k != BLOCK_OPTION}
    return s3_options(root, options)


def s3_options(root: str, options: dict) -> dict:
    out = {k: v for k, v in options.items() if k not in (BLOCK_OPTION, "endpoint_url")}
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url") or os.environ.get(ENDPOINT_ENV)
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        # SigV4 needs a region; servers other than AWS accept any
        client_kwargs.setdefault(
            "region_name", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
    out["client_kwargs"] = client_kwargs
    # Listings cached in one process hide manifests another process committed since.
    out.setdefault("use_listings_cache", False)
    block = options.get(BLOCK_OPTION)
    if block:
        out.update(block_credentials(block))
    elif not out.get("anon") and not ambient_credentials():
        where = f" at {endpoint}" if endpoint else ""
        raise StorageConfigError(
            f"artifact root {root}{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or storage.{BLOCK_OPTION}: NAME of a Prefect Secret block "
            'holding {"key": ..., "secret": ...}'
        )
    return out


@functools.cache
def block_credentials(name: str) -> dict:
    """s3fs key/secret[/token] from a saved Prefect Secret block (loaded once per process)."""
    from prefect.blocks.system import Secret

    try:
        value = cast(Secret, Secret.load(name)).get()  # sync-compatible: the block itself outside async code
    except ValueError:
        raise StorageConfigError(
            f"storage.{BLOCK_OPTION}: no saved Prefect Secret block named '{name}' "
            f"(create it with Secret(value={{'key': ..., 'secret': ...}}).save('{name}'))"
        ) from None
    if not isinstance(value, dict) or not {"key", "secret"} <= set(value):
        held = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise StorageConfigError(
            f'storage.{BLOCK_OPTION} \'{name}\': expected a Secret holding JSON {{"key": ..., "secret": ...}}, '
            f"found {held}"
        )
    return {k: value[k] for k in ("key", "secret", "token") if value.get(k)}


def ambient_credentials() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    return _botocore_chain_has_credentials()


@functools.lru_cache(maxsize=1)
def _botocore_chain_has_credentials() -> bool:
    """Profiles, SSO, container and instance roles: botocore's own search, done once per process."""
    import botocore.session

    return botocore.session.get_session().get_credentials() is not None
