"""Registering the fused model in the Kubeflow Model Registry: the real ``model-registry``
client against the fake REST server of ``model_registry_server`` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
import warnings
from typing import Any

import pytest
from model_registry import ModelRegistry
from model_registry_server import PREFIX, FakeModelRegistry

from mtnlg.cluster.registry import RegistrationConflict, RegistryConfig, RegistryError, register_model, version_metadata
from mtnlg.config import ConfigError, load_config

pytestmark = pytest.mark.unit

URI = "gs://bucket/run-1/model/hf"
METRICS = {"val_perplexity": 31.25, "val_loss": 3.4420, "val_bits_per_byte": 1.07, "cloze_accuracy": 0.625,
           "cloze_items": 40, "parameters": 124_439_808, "train_tokens": 2_621_440_000, "train_steps": float("nan"),
           "is_best": True, "note": "not a number"}
LINEAGE = {"pipeline_run": "run-1", "checkpoint": "gs://bucket/run-1/ckpt/step-2000",
           "training_data": "gs://bucket/data/docs", "recipe": "gpt-small", "seed": 7, "empty": ""}


@pytest.fixture
def reg():
    with FakeModelRegistry() as fake:
        yield fake


def _register(cfg: RegistryConfig, *, uri: str = URI, version: str = "run-1", **kw: Any) -> dict[str, str]:
    args: dict[str, Any] = {"name": "gpt-docs", "uri": uri, "version": version, "metrics": METRICS,
                            "lineage": LINEAGE, **kw}
    return register_model(cfg, **args)


def _props(obj: dict[str, Any]) -> dict[str, Any]:
    """``customProperties`` as stored, by key: ``(metadataType, value)``."""
    out = {}
    for key, meta in obj["customProperties"].items():
        kind = meta["metadataType"]
        value_key = {"MetadataDoubleValue": "double_value", "MetadataIntValue": "int_value",
                     "MetadataStringValue": "string_value", "MetadataBoolValue": "bool_value"}[kind]
        out[key] = (kind, meta[value_key])
    return out


def _client(reg: FakeModelRegistry, author: str, cls: type[ModelRegistry] = ModelRegistry) -> ModelRegistry:
    """A client of the fake, built as a user would (no token: none is needed over http)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="User access token is missing")
        return cls(reg.url, author=author, is_secure=False, async_runner=asyncio.run)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(reg: FakeModelRegistry, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(reg.url + PREFIX + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------
# registering
# ---------------------------------------------------------------------------------------


def test_registers_the_model_version_and_artifact_with_metrics_and_lineage(reg):
    out = _register(RegistryConfig(url=reg.url, author="ci-bot", description="docs model, run 1"))

    (rm,) = reg.registered_models.values()
    (mv,) = reg.model_versions.values()
    (art,) = reg.model_artifacts.values()
    assert out == {"registered_model_id": rm["id"], "model_version_id": mv["id"], "name": "gpt-docs",
                   "version": "run-1", "uri": URI}
    assert rm["name"] == "gpt-docs" and rm["owner"] == "ci-bot" and rm["state"] == "LIVE"
    assert mv["name"] == "run-1" and mv["registeredModelId"] == rm["id"] and mv["author"] == "ci-bot"
    assert mv["description"] == "docs model, run 1"
    assert reg.artifact_parent[art["id"]] == mv["id"]
    assert art["uri"] == URI and art["name"] == "gpt-docs" and art["artifactType"] == "model-artifact"
    assert (art["modelFormatName"], art["modelFormatVersion"]) == ("huggingface", "1")
    # finite numbers and non-empty strings only: no NaN, bool, text metric, int lineage or empty string
    assert _props(mv) == {
        "val_perplexity": ("MetadataDoubleValue", 31.25),
        "val_loss": ("MetadataDoubleValue", 3.442),
        "val_bits_per_byte": ("MetadataDoubleValue", 1.07),
        "cloze_accuracy": ("MetadataDoubleValue", 0.625),
        "cloze_items": ("MetadataIntValue", "40"),
        "parameters": ("MetadataIntValue", "124439808"),
        "train_tokens": ("MetadataDoubleValue", 2621440000.0),  # too big for the registry's int values
        "pipeline_run": ("MetadataStringValue", "run-1"),
        "checkpoint": ("MetadataStringValue", "gs://bucket/run-1/ckpt/step-2000"),
        "training_data": ("MetadataStringValue", "gs://bucket/data/docs"),
        "recipe": ("MetadataStringValue", "gpt-small"),
    }
    # and the client reads back what was stored
    client = _client(reg, "reader")
    version = client.get_model_version("gpt-docs", "run-1")
    assert version is not None and version.custom_properties is not None
    assert version.custom_properties["cloze_items"] == 40 and version.custom_properties["recipe"] == "gpt-small"
    artifact = client.get_model_artifact("gpt-docs", "run-1")
    assert artifact is not None and artifact.uri == URI and artifact.model_format_name == "huggingface"


def test_a_retry_of_the_same_version_and_uri_succeeds_and_writes_nothing(reg):
    cfg = RegistryConfig(url=reg.url)
    first = _register(cfg)
    writes = len(reg.writes())
    assert writes == 3  # registered model, model version, artifact

    again = _register(cfg)

    assert again == first
    assert len(reg.writes()) == writes
    assert (len(reg.registered_models), len(reg.model_versions), len(reg.model_artifacts)) == (1, 1, 1)


def test_the_same_version_with_another_uri_is_a_conflict_naming_both(reg):
    cfg = RegistryConfig(url=reg.url)
    _register(cfg)
    writes = len(reg.writes())
    other = "gs://bucket/run-2/model/hf"

    with pytest.raises(RegistrationConflict) as e:
        _register(cfg, uri=other)

    message = str(e.value)
    assert URI in message and other in message and "'gpt-docs'" in message and "'run-1'" in message
    assert isinstance(e.value, RuntimeError)
    assert len(reg.writes()) == writes
    assert [a["uri"] for a in reg.model_artifacts.values()] == [URI]


def test_a_second_version_joins_the_same_registered_model(reg):
    cfg = RegistryConfig(url=reg.url)
    first = _register(cfg)
    uri2 = "gs://bucket/run-2/model/hf"
    second = _register(cfg, uri=uri2, version="run-2", metrics={"val_perplexity": 29.5}, lineage={})

    assert second["registered_model_id"] == first["registered_model_id"]
    assert second["model_version_id"] != first["model_version_id"]
    assert len(reg.registered_models) == 1
    versions = sorted(reg.model_versions.values(), key=lambda v: int(v["id"]))
    assert [v["name"] for v in versions] == ["run-1", "run-2"]
    assert {v["registeredModelId"] for v in versions} == {first["registered_model_id"]}
    assert _props(versions[1]) == {"val_perplexity": ("MetadataDoubleValue", 29.5)}
    assert [a["uri"] for a in reg.artifacts_of(second["model_version_id"])] == [uri2]
    assert [a["uri"] for a in reg.artifacts_of(first["model_version_id"])] == [URI]


def test_config_names_replace_the_callers_defaults(reg):
    out = _register(RegistryConfig(url=reg.url, model_name="docs-lm", version="v7"))
    assert (out["name"], out["version"]) == ("docs-lm", "v7")
    assert [m["name"] for m in reg.registered_models.values()] == ["docs-lm"]
    assert [v["name"] for v in reg.model_versions.values()] == ["v7"]


def test_an_injected_client_is_used_as_it_is(reg):
    client = _client(reg, "notebook-user")
    out = _register(RegistryConfig(), client=client)
    (mv,) = reg.model_versions.values()
    assert out["model_version_id"] == mv["id"] and mv["author"] == "notebook-user"


def test_a_version_registered_meanwhile_by_another_run_is_taken_as_done(reg):
    class Racing(ModelRegistry):
        """Another run of the step registers the same version just before this one does."""

        def register_model(self, *args: Any, **kwargs: Any) -> Any:
            super().register_model(*args, **kwargs)
            return super().register_model(*args, **kwargs)  # the client: "Version run-1 already exists"

    out = _register(RegistryConfig(), client=_client(reg, "mtnlg", Racing))
    assert out["model_version_id"] in reg.model_versions
    assert (len(reg.model_versions), len(reg.model_artifacts)) == (1, 1)


def test_a_version_without_its_artifact_is_a_clear_error(reg):
    rm = _post(reg, "/registered_models", {"name": "gpt-docs"})
    _post(reg, "/model_versions", {"name": "run-1", "registeredModelId": rm["id"]})

    with pytest.raises(RegistrationConflict, match="without a model artifact"):
        _register(RegistryConfig(url=reg.url))
    assert reg.model_artifacts == {}


def test_the_token_file_named_by_user_token_envvar_is_sent(reg, tmp_path, monkeypatch):
    reg.token = "s3cret"
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    monkeypatch.setenv("MR_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)

    _register(RegistryConfig(url=reg.url, user_token_envvar="MR_TOKEN_PATH"))
    assert {r.headers.get("Authorization") for r in reg.requests} == {"Bearer s3cret"}

    with pytest.raises(RegistryError, match="401"):  # no token: the server refuses
        _register(RegistryConfig(url=reg.url))
    with pytest.raises(RegistryError, match="MR_MISSING is not set"):
        _register(RegistryConfig(url=reg.url, user_token_envvar="MR_MISSING"))


def test_a_server_error_names_the_registry_and_the_status(reg):
    client = _client(reg, "mtnlg")
    reg.fail_next = [503]
    with pytest.raises(RegistryError, match="HTTP 503") as e:
        _register(RegistryConfig(), client=client)
    assert reg.url in str(e.value) and "looking up 'gpt-docs' version 'run-1'" in str(e.value)


def test_an_unreachable_registry_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        _register(RegistryConfig(url=url))
    assert time.monotonic() - start < 10
    assert isinstance(e.value, RegistryError)
    assert url in str(e.value) and "unreachable" in str(e.value)
    assert e.value.__cause__ is not None


def test_an_https_registry_without_a_token_is_refused_before_any_request(monkeypatch, tmp_path):
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-such-token"))
    with pytest.raises(RegistryError, match="Unable read user token"):
        _register(RegistryConfig(url=f"https://127.0.0.1:{_closed_port()}"))


# ---------------------------------------------------------------------------------------
# the config and the metadata
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, match", [
    ("ftp://registry:8080", "must start with http:// or https://"),
    ("model-registry-service.kubeflow:8080", "must start with http:// or https://"),
    ("http://", "has no host"),
    ("http://registry:8080/api/model_registry/v1", "without a path"),
    ("https://user:pw@registry:8443", "credentials"),
    ("http://registry:port", "not a valid address"),
])
def test_a_bad_url_is_rejected_naming_url(url, match):
    with pytest.raises(ConfigError, match=match) as e:
        RegistryConfig(url=url)
    assert str(e.value).startswith("url: ")


def test_config_loads_from_overrides_and_checks_its_fields():
    cfg = load_config(RegistryConfig, None, ["url=https://model-registry-service.kubeflow.svc.cluster.local:8443",
                                             "model_name=docs", "user_token_envvar=MR_TOKEN"])
    assert cfg.enabled and cfg.model_name == "docs" and cfg.user_token_envvar == "MR_TOKEN"
    assert not RegistryConfig().enabled
    assert RegistryConfig(url="http://127.0.0.1:8080/").url.endswith("/")
    with pytest.raises(ConfigError, match="^url: "):
        load_config(RegistryConfig, None, ["url=registry:8080"])
    with pytest.raises(ConfigError, match="user_token_envvar"):
        RegistryConfig(user_token_envvar="not a name")
    with pytest.raises(ConfigError, match="author"):
        RegistryConfig(author="")


def test_register_without_a_url_or_client_is_a_config_error():
    with pytest.raises(ConfigError, match="url: not set"):
        _register(RegistryConfig())


def test_version_metadata_keeps_finite_numbers_and_strings():
    meta = version_metadata({"a": 1, "b": 2.5, "c": float("inf"), "d": True, "e": "x", "big": 5_000_000_000},
                            {"run": "r1", "n": 3, "blank": ""})
    assert meta == {"a": 1, "b": 2.5, "big": 5e9, "run": "r1"}
    assert isinstance(meta["a"], int) and isinstance(meta["big"], float)
    with pytest.raises(ValueError, match="'a'"):
        version_metadata({"a": 1}, {"a": "x"})


# ---------------------------------------------------------------------------------------
# the fake server itself
# ---------------------------------------------------------------------------------------


def test_the_fake_answers_not_found_and_conflicts_as_the_real_server(reg):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{reg.url}{PREFIX}/registered_model?name=nope", timeout=5)
    assert e.value.code == 404
    assert json.loads(e.value.read()) == {"code": "Not Found",
                                          "message": "no registered models found for name=nope, externalId=: not found"}
    rm = _post(reg, "/registered_models", {"name": "m", "customProperties": {}})
    assert rm["id"] == "1" and rm["createTimeSinceEpoch"].isdigit() and rm["state"] == "LIVE"
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(reg, "/registered_models", {"name": "m"})
    assert e.value.code == 409 and json.loads(e.value.read())["code"] == "Conflict"
    with urllib.request.urlopen(f"{reg.url}{PREFIX}/registered_models?pageSize=1", timeout=5) as r:
        page = json.loads(r.read())
    assert page == {"items": [rm], "nextPageToken": "", "pageSize": 1, "size": 1}
