"""Registering the fused model in the Kubeflow Model Registry (optional).

    cfg = RegistryConfig(url="https://model-registry-service.kubeflow.svc.cluster.local:8443")
    ids = register_model(cfg, name="gpt-docs", uri="gs://bucket/run/model/hf", version="run-42",
                         metrics={"val_perplexity": 31.2, "parameters": 124_000_000},
                         lineage={"pipeline_run": "run-42", "checkpoint": "gs://bucket/run/ckpt/step-1000"})
    # {"registered_model_id": "1", "model_version_id": "2", "name": "gpt-docs", "version": "run-42", "uri": ...}

**Enabling it.** Registration is off while ``url`` is empty. The deploy step turns it on with
an override such as ``registry.url=https://model-registry-service.kubeflow.svc.cluster.local:8443``
(or ``http://...:8080``, the registry's plain REST port); ``registry.model_name`` and
``registry.version`` replace the step's defaults (the service name, the pipeline run).

**What is registered**, through the registry's own Python client (``model-registry``):

* the registered model ``name`` (created on first use, then reused);
* the model version ``version``, its ``customProperties`` holding the evaluation metrics
  (finite numbers only: ``val_perplexity``, ``val_loss``, ``val_bits_per_byte``,
  ``cloze_accuracy``, ``cloze_items``, ``parameters``, ...) and the lineage strings
  (``pipeline_run``, ``checkpoint``, ``training_data``, ``recipe``, ...);
* its model artifact: ``uri`` (the Hugging Face directory the fuse step writes, ``MODEL/hf``)
  with model format ``huggingface``, format version ``1``, which KServe's
  ``kserve-huggingfaceserver`` runtime serves.

**Retries are safe.** The client refuses to register a version twice. A version already
registered with the same ``uri`` is taken as this registration done before (a retried
pipeline step): nothing is written and its ids are returned. The same version with another
``uri`` is a :class:`RegistrationConflict` naming both. Any other failure is a
:class:`RegistryError` naming the registry's address and the cause (an unreachable registry
fails on the first request, which the client makes when it connects).

**Credentials.** With ``user_token_envvar`` set, that environment variable holds the *path of
a file* containing the bearer token (the client reads the file). Without it the client reads
the file named by ``KF_PIPELINES_SA_TOKEN_PATH``, else the pod's service-account token
(``/var/run/secrets/kubernetes.io/serviceaccount/token``). An ``https://`` registry needs a
token; a plain ``http://`` one is used without one if none is found. ``custom_ca`` is the
path of a PEM bundle for verifying an ``https://`` registry's certificate (e.g. one signed by
the cluster's service CA). The client has no request-timeout option: a registry that never
answers is waited on for the client's own 5 minutes per request.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import os
import re
import warnings
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from mtnlg.config import Config, ConfigError
from mtnlg.progress import get_logger

if TYPE_CHECKING:
    from model_registry import ModelRegistry

log = get_logger("mtnlg.cluster")

MODEL_FORMAT_NAME = "huggingface"
MODEL_FORMAT_VERSION = "1"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# the registry's int metadata values are int32 strings of at most 9 digits; larger ints go as doubles
_MAX_INT_VALUE = 999_999_999
_T = TypeVar("_T")


class RegistryError(RuntimeError):
    """The Model Registry could not be reached or refused a request: its address and the cause."""


class RegistrationConflict(RegistryError):
    """The model version is already registered with another artifact uri."""


@dataclass
class RegistryConfig(Config):
    # the registry's REST address, scheme://host[:port]; empty = do not register
    url: str = ""
    author: str = "mtnlg"
    # the registered model's name (default: the caller's, e.g. the service name)
    model_name: str = ""
    # the model version's name (default: the caller's, e.g. the pipeline run)
    version: str = ""
    # the model version's description
    description: str = ""
    # an env var holding the path of a file with the bearer token (default: the client's own lookup)
    user_token_envvar: str = ""
    # a PEM bundle to verify an https:// registry's certificate (default: the system's CAs)
    custom_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def validate(self) -> None:
        if self.url:
            _parse_url(self.url)
        if not self.author:
            raise ConfigError("author: must be set (the registry records it on every version)")
        if self.user_token_envvar and not _ENV_NAME.match(self.user_token_envvar):
            raise ConfigError(f"user_token_envvar: {self.user_token_envvar!r} is not an environment variable name")


def _parse_url(url: str) -> tuple[bool, int]:
    """``(is_secure, port)`` of a registry address; ConfigError naming ``url`` if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"url: {url!r} is not a valid address: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"url: {url!r} must start with http:// or https:// "
                          "(e.g. https://model-registry-service.kubeflow.svc.cluster.local:8443)")
    if not parts.hostname:
        raise ConfigError(f"url: {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"url: {url!r} must not hold credentials (use user_token_envvar)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"url: {url!r} must be scheme://host[:port], without a path, query or fragment")
    secure = parts.scheme == "https"
    return secure, port or (443 if secure else 80)


# ---------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------


def version_metadata(metrics: Mapping[str, Any], lineage: Mapping[str, Any]) -> dict[str, int | float | str]:
    """The model version's custom properties: the finite numbers of ``metrics`` (ints as ints
    while the registry's int type holds them, else as doubles) and the non-empty strings of
    ``lineage``; anything else is left out. A key in both is an error."""
    out: dict[str, int | float | str] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if isinstance(value, numbers.Integral) and abs(int(value)) <= _MAX_INT_VALUE:
            out[str(key)] = int(value)
        elif math.isfinite(float(value)):
            out[str(key)] = float(value)
    for key, value in lineage.items():
        if not isinstance(value, str) or not value:
            continue
        if str(key) in out:
            raise ValueError(f"metadata key {key!r} is both a metric and a lineage entry")
        out[str(key)] = value
    return out


# ---------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one client call on a fresh event loop (the client's own runner patches asyncio)."""
    return asyncio.run(coro)


def _describe(e: BaseException) -> str:
    status, body = getattr(e, "status", None), getattr(e, "body", None)
    if status is not None:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}: {text.strip()[:500]}".strip()
    return f"{type(e).__name__}: {e}"


@contextmanager
def _calls(where: str, what: str) -> Iterator[None]:
    """Turn the client's failures into a RegistryError naming the registry and the cause."""
    try:
        yield
    except RegistryError:
        raise
    except OSError as e:  # refused, DNS, TLS, timeouts: the connection errors of the HTTP client
        raise RegistryError(f"model registry at {where} is unreachable ({what}): {_describe(e)}") from e
    except Exception as e:
        raise RegistryError(f"model registry at {where}: {what} failed: {_describe(e)}") from e


def connect(config: RegistryConfig) -> ModelRegistry:
    """A client for ``config.url``; it asks the registry for one model, so an unreachable
    registry or a refused token fails here, as a RegistryError."""
    from model_registry import ModelRegistry
    from model_registry.exceptions import StoreError

    if not config.url:
        raise ConfigError("url: not set, so there is no registry to register in")
    secure, port = _parse_url(config.url)
    if config.user_token_envvar and config.user_token_envvar not in os.environ:
        raise RegistryError(f"user_token_envvar: {config.user_token_envvar} is not set "
                            "(it should hold the path of a file with the registry's bearer token)")
    if secure and config.custom_ca and not Path(config.custom_ca).is_file():
        raise RegistryError(f"custom_ca: {config.custom_ca!r} is not a file")
    address = config.url.rstrip("/")
    with warnings.catch_warnings(), _calls(config.url, "connecting"):
        # no token: fine for a plain-http registry; for https the client refuses below, more clearly
        warnings.filterwarnings("ignore", message="User access token is missing")
        try:
            return ModelRegistry(address, port, author=config.author, is_secure=secure,
                                 user_token_envvar=config.user_token_envvar or None,
                                 custom_ca=(config.custom_ca or None) if secure else None,
                                 async_runner=_run)
        except StoreError as e:  # no token for https, or an unreadable token file
            raise RegistryError(f"model registry at {config.url}: {e} (set registry.user_token_envvar to an "
                                "env var naming a token file, or run in a pod with a service-account token)") from e


# ---------------------------------------------------------------------------------------
# registering
# ---------------------------------------------------------------------------------------


def _address_of(client: ModelRegistry) -> str:
    """The address an injected client talks to, for messages."""
    host = getattr(getattr(getattr(client, "_api", None), "config", None), "host", None)
    return host if isinstance(host, str) and host else "<the given client's registry>"


def _registered(client: ModelRegistry, where: str, name: str, version: str, uri: str,
                metadata: Mapping[str, Any]) -> dict[str, str] | None:
    """The ids of ``name``/``version`` if it is registered with ``uri``; None if it is not
    registered; RegistrationConflict if it is, with another uri (or none)."""
    with _calls(where, f"looking up {name!r} version {version!r}"):
        rm = client.get_registered_model(name)
        if rm is None:
            return None
        mv = client.get_model_version(name, version)
        if mv is None:
            return None
        artifact = client.get_model_artifact(name, version)
    if artifact is None:
        raise RegistrationConflict(
            f"model {name!r} version {version!r} is registered at {where} without a model artifact named "
            f"{name!r} (an interrupted registration?): archive that version, or register under another version")
    if artifact.uri != uri:
        raise RegistrationConflict(
            f"model {name!r} version {version!r} is already registered at {where} with uri {artifact.uri!r}, "
            f"not {uri!r}: register this model under another version (registry.version=...)")
    stored = dict(mv.custom_properties or {})
    differ = sorted(k for k in set(stored) | set(metadata) if stored.get(k) != metadata.get(k))
    if differ:
        log.warning("model %r version %r was registered with other metadata (%s); keeping the registered one",
                    name, version, ", ".join(differ))
    assert rm.id is not None and mv.id is not None
    return {"registered_model_id": rm.id, "model_version_id": mv.id, "name": name, "version": version, "uri": uri}


def register_model(config: RegistryConfig, *, name: str, uri: str, version: str, metrics: Mapping[str, Any],
                   lineage: Mapping[str, Any], client: ModelRegistry | None = None) -> dict[str, str]:
    """Register ``uri`` as model ``config.model_name or name``, version ``config.version or
    version``, with ``metrics`` and ``lineage`` as the version's metadata (:func:`version_metadata`).

    ``client``: an already-built ``model_registry.ModelRegistry`` (default: :func:`connect`).
    Returns ``{"registered_model_id", "model_version_id", "name", "version", "uri"}``; a
    version already registered with the same ``uri`` returns its ids and writes nothing."""
    from model_registry.exceptions import StoreError

    name, version = config.model_name or name, config.version or version
    if not name:
        raise ValueError("no registered model name: pass name= or set registry.model_name")
    if not version:
        raise ValueError("no model version: pass version= or set registry.version")
    if not uri:
        raise ValueError("no model uri to register")
    metadata = version_metadata(metrics, lineage)
    if client is None:
        client = connect(config)
    where = config.url or _address_of(client)

    if (done := _registered(client, where, name, version, uri, metadata)) is not None:
        log.info("model %r version %r is already registered at %s (version id %s) with %s",
                 name, version, where, done["model_version_id"], uri)
        return done
    with _calls(where, f"registering {name!r} version {version!r}"):
        try:
            client.register_model(name, uri, model_format_name=MODEL_FORMAT_NAME,
                                  model_format_version=MODEL_FORMAT_VERSION, version=version,
                                  version_description=config.description or None, metadata=metadata)
        except StoreError as e:  # registered meanwhile by another run of this step
            if "already exists" not in str(e):
                raise
            log.info("model %r version %r was registered meanwhile: %s", name, version, e)
    done = _registered(client, where, name, version, uri, metadata)
    if done is None:
        raise RegistryError(f"model registry at {where}: {name!r} version {version!r} is not found after registering")
    log.info("registered model %r version %r at %s: %s (registered model id %s, version id %s)",
             name, version, where, uri, done["registered_model_id"], done["model_version_id"])
    return done
