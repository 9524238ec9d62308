"""GET /openapi.json: an OpenAPI 3.1 description of the gateway's OpenAI endpoints and admin API.

It says what the gateway itself checks, no more. The inference bodies are rendered from the very tables
their checks read (validation.py, messages_validation.py), so the two cannot drift; the admin bodies are
written here after ModelSpec and KeyRequest. The inference bodies allow other fields, which reach the engine
unchanged and are the engine's to judge.
tests/unit/test_gateway_fuzz.py fuzzes the gateway from this document.
"""

from __future__ import annotations

import json

from aiohttp import web

from nebula import __version__
from nebula.core.apikeys import MAX_CONCURRENT, MAX_MODELS, MAX_NAME, MAX_RPM
from nebula.services.gateway.audio_api import AUDIO_PATHS
from nebula.services.gateway.request_rules import MODEL_SCHEMA, Schema, body_schema, opt
from nebula.services.gateway.validation import ENDPOINTS

NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,62}$"


def _int(minimum: int) -> Schema:
    return opt({"type": "integer", "minimum": minimum})


def _inference_bodies() -> dict[str, Schema]:
    """The request bodies of the inference endpoints, rendered from the tables their checks read."""
    return {path: body_schema(endpoint.rules) for path, endpoint in ENDPOINTS.items()}


def _stored_response_paths() -> dict[str, Schema]:
    """The Responses API's reads of a stored response, and the tokenizer's unversioned spellings."""
    rid = _path_param("id", {"type": "string", "pattern": "^resp_[0-9a-f]{16}_[0-9a-f]{32}$",
                             "description": "An id this gateway issued (it names the replica holding it)."})
    errors = ("401", "403", "404", "429", "503")
    bodies = _inference_bodies()
    return {
        "/v1/responses/{id}": {"get": _op(
            "A stored response, from the replica that holds it", "the response (SSE when stream is true)",
            params=[rid, _query_param("stream", {"type": "boolean"}),
                    _query_param("starting_after", {"type": "integer", "minimum": 0})], errors=errors)},
        "/v1/responses/{id}/cancel": {"post": _op("Cancel a background response", "the response",
                                                  params=[rid], errors=("400", *errors))},
        **{f"/{path}": {"post": _op(f"vLLM's /{path} (as /v1/{path})", "the engine's answer", bodies[path],
                                    errors=("400", "401", "403", "404", "413", "429", "503"))}
           for path in ("tokenize", "detokenize")},
    }


def _audio_op(path: str) -> Schema:
    """An audio upload (audio_api.py): a multipart form whose `model` routes it; the rest is the engine's."""
    form = {"type": "object", "required": ["model", "file"], "additionalProperties": True, "properties": {
        "model": MODEL_SCHEMA,
        "file": {"type": "string", "format": "binary", "description": "The audio (wav, flac, mp3, ogg, webm...)."}}}
    op = _op(f"OpenAI-compatible /v1/{path}, forwarded unchanged to a ready replica of a transcribe model",
             "the engine's answer (json, text, srt, vtt; SSE when stream is true)",
             errors=("400", "401", "403", "404", "413", "429", "503"))
    op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    op["responses"]["413"] = _error_response("upload larger than gateway.max_upload_bytes")
    return op


def _model_spec() -> Schema:
    return {"type": "object", "required": ["name", "source"], "additionalProperties": True, "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "source": {"type": "string", "pattern": "\\S",
                   "description": "An absolute model directory on the nodes, a hub reference, or a catalog name "
                                  "(GET /v1/admin/catalog)."},
        "size": opt({"type": "string", "description": "With a catalog name: the entry's size (7b)."}),
        "quant": opt({"type": "string", "description": "With a catalog name: the variant's quant (awq, fp8)."}),
        "engine_runtime": opt({"type": "string", "pattern": NAME_PATTERN,
                                "description": "An engine runtime installed on the nodes (vllm-0.32-cu13)."}),
        "tensor_parallel_size": opt({"type": "integer", "minimum": 1, "maximum": 16}),
        "allow_pending": opt({"type": "boolean", "description": "Store it even when no GPU holds its estimate."}),
        "task": opt({"enum": ["generate", "embed", "rerank", "transcribe"]}),
        "replicas": opt({"type": "integer", "minimum": 1, "maximum": 64}),
        "gpus_per_replica": opt({"type": "integer", "minimum": 0, "maximum": 16}),
        "gpu_memory_mib": _int(0), "engine": opt({"enum": ["vllm"]}),
        "engine_args": opt({"type": "array", "items": {"type": "string"},
                             "description": "`vllm serve` flags among [engine] allowed_engine_args."}),
        "max_model_len": _int(1),
        "trust_remote_code": opt({"type": "boolean", "description": "Needs [engine] allow_trust_remote_code."}),
        "revision": opt({"type": "string"}),
        "labels": opt({"type": "object", "additionalProperties": {"type": "string"}}),
        "scaling": opt({"type": "object", "additionalProperties": True, "description": "Elastic capacity: "
                         "the scheduler keeps the model between min_replicas and max_replicas by load, and "
                         "unloads (or puts to sleep) an idle one after idle_unload_s.", "properties": {
                             "min_replicas": opt({"type": "integer", "minimum": 0, "maximum": 64}),
                             "max_replicas": opt({"type": "integer", "minimum": 1, "maximum": 64}),
                             "idle_unload_s": opt({"type": "number", "exclusiveMinimum": 0, "maximum": 2592000}),
                             "idle_action": opt({"enum": ["stop", "sleep"]}),
                             "sleep_level": opt({"type": "integer", "minimum": 1, "maximum": 2}),
                             "priority": opt({"type": "integer", "minimum": -1000, "maximum": 1000}),
                             "target_inflight": opt({"type": "number", "exclusiveMinimum": 0})}}),
    }}


def _key_request() -> Schema:
    return {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": "^[^\\x00-\\x1f\\x7f]*\\S"
                 "[^\\x00-\\x1f\\x7f]*$"},
        "scopes": opt({"type": "array", "minItems": 1, "items": {"enum": ["inference", "admin"]}}),
        "models": opt({"type": "array", "minItems": 1, "maxItems": MAX_MODELS,
                        "items": {"type": "string", "pattern": NAME_PATTERN},
                        "description": "Only these models (others get 403). Absent: every model."}),
        "limits": opt({"type": "object", "additionalProperties": False, "properties": {
            "requests_per_minute": opt({"type": "integer", "minimum": 1, "maximum": MAX_RPM}),
            "max_concurrent": opt({"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENT})}}),
    }}


def _pull_request() -> Schema:
    return {"type": "object", "additionalProperties": True,
            "anyOf": [{"required": ["source"]}, {"required": ["model"]}], "properties": {
                "source": {"type": "string", "description": "org/name, hf://org/name, modelscope://org/name"},
                "model": {"type": "string", "pattern": NAME_PATTERN, "description": "a loaded model's source"},
                "revision": opt({"type": "string"}), "nodes": opt({"type": "array", "items": {"type": "string"}})}}


def _adapters() -> Schema:
    """/v1/admin/adapters (lora_api.py): a LoRA adapter on its base's replicas."""
    body = {"type": "object", "required": ["name", "base", "source"], "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN, "description": "what requests give as `model`"},
        "base": {"type": "string", "pattern": NAME_PATTERN, "description": "a model loaded with --enable-lora"},
        "source": {"type": "string", "description": "an absolute adapter directory, or a hub repo id"},
        "rank": opt({"type": "integer", "minimum": 1, "maximum": 1024})}}
    add = _op("Serve a LoRA adapter on every replica of its base", "created", body,
              errors=("400", "401", "403", "404", "409", "413", "503"), ok_status="201")
    add["responses"]["200"] = {"description": "unchanged: the same adapter exists already",
                               "content": {"application/json": {"schema": {"type": "object"}}}}
    return add


def _error_response(description: str, schema: str = "Error") -> Schema:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_ERRORS = {"400": "invalid request (`param` names the field)", "401": "missing or unknown API key",
           "403": "the key's scope or models do not allow this", "404": "no such model, key or path",
           "409": "conflicts with the current state", "413": "body larger than gateway.max_body_bytes",
           "429": "the key's rate or concurrency limit (see Retry-After)",
           "503": "no ready replica, an elastic model still waking after gateway.wake_wait_s (model_waking), "
                  "or etcd unreachable (see Retry-After)"}


def _op(summary: str, ok: str, body: Schema | None = None, params: list[Schema] | None = None,
        errors: tuple[str, ...] = ("400", "401", "403", "404", "429", "503"), ok_status: str = "200",
        ok_schema: Schema | None = None, error_schema: str = "Error") -> Schema:
    op: Schema = {"summary": summary, "responses": {
        ok_status: {"description": ok, "content": {"application/json": {"schema": ok_schema or {"type": "object"}}}},
        **{code: _error_response(_ERRORS[code], error_schema) for code in errors}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query_param(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _patch_body() -> Schema:
    scale = {"type": "object", "required": ["replicas"], "additionalProperties": False,
             "properties": {"replicas": {"type": "integer", "minimum": 1, "maximum": 64}}}
    update = {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": {
        "revision": {"type": ["string", "null"]}, "engine_args": {"type": "array", "items": {"type": "string"}},
        "engine_runtime": {"type": ["string", "null"]}, "max_model_len": {"type": ["integer", "null"], "minimum": 1},
        "trust_remote_code": {"type": "boolean"}}}
    return {"oneOf": [scale, update]}


def _rollout_paths(name: Schema, admin: tuple[str, ...]) -> Schema:
    """update_api.py and drain_api.py."""
    node = _path_param("node", {"type": "string", "pattern": NAME_PATTERN})
    return {
        "/v1/admin/models/{name}/rollout": {"get": _op("A model's rolling replace: in progress, and how the last "
                                                       "one stands or ended", "the rollout", params=[name],
                                                       errors=(*admin, "404"))},
        "/v1/admin/nodes/{node}/drain": {
            "post": _op("Drain a node: nothing new placed there, its replicas move away with surge (refused when a "
                        "model could run nowhere else, unless force)", "the drain", params=[node],
                        errors=(*admin, "404", "409"), body={"type": "object", "additionalProperties": False,
                                                             "properties": {"force": {"type": "boolean"}}}),
            "delete": _op("Undrain a node", "undrained", params=[node], errors=(*admin, "404"))},
        "/v1/admin/drains": {"get": _op("Drained nodes and the replicas each still holds", "a list", errors=admin)},
    }


def openapi_document() -> Schema:
    bodies = _inference_bodies()
    inference = {f"/v1/{path}": {"post": _op(
        f"{'Anthropic' if path.startswith('messages') else 'OpenAI'}-compatible /v1/{path}, forwarded to a "
        "ready replica", "the engine's answer (SSE when stream is true)", body,
        errors=("400", "401", "403", "404", "413", "429", "503"),
        error_schema="AnthropicError" if path.startswith("messages") else "Error")}
        for path, body in bodies.items()}
    name = _path_param("name", {"type": "string", "pattern": NAME_PATTERN})
    key_id = _path_param("id", {"type": "string", "pattern": "^[0-9a-f]{16}$"})
    pull_id = _path_param("id", {"type": "string"})
    admin = ("400", "401", "403", "503")
    paths: Schema = {
        **inference,
        **{f"/v1/{path}": {"post": _audio_op(path)} for path in AUDIO_PATHS},
        **_stored_response_paths(),
        "/v1/models": {"get": _op("Models and their ready replicas", "a list", errors=("401", "403", "429"))},
        "/v1/models/{name}": {"get": _op("One model", "the model", params=[
            _path_param("name", {"type": "string"})], errors=("401", "403", "404", "429"))},
        "/v1/admin/models": {
            "post": _op("Load a model (idempotent: the same spec again changes nothing)", "created or unchanged",
                        _model_spec(), errors=(*admin, "409", "413")),
            "get": _op("Models with their instances", "a list", errors=admin)},
        "/v1/models/load": {"post": _op("Load a model (alias)", "created or unchanged", _model_spec(),
                                        errors=(*admin, "409", "413"))},
        "/v1/admin/models/{name}": {
            "get": _op("One model with its instances", "the model", params=[name], errors=(*admin, "404")),
            "delete": _op("Unload a model (refused while LoRA adapters are served on it)", "deleted", params=[name],
                          errors=(*admin, "404", "409")),
            "patch": _op("Change a model's replica count ({replicas} alone), or update its engine with a rolling "
                         "replace (nebula update: update_api.py)", "the new spec", params=[name],
                         errors=(*admin, "404", "409"), body=_patch_body())},
        **_rollout_paths(name, admin),
        "/v1/admin/nodes": {"get": _op("Live nodes", "a list", errors=admin)},
        "/v1/admin/catalog": {"get": _op("Catalog entries matching every word of q (all without q), best first",
                                         "a list", params=[_query_param("q", {"type": "string", "maxLength": 200})],
                                         errors=admin)},
        "/v1/admin/catalog/{name}": {"get": _op(
            "One catalog variant: a variant's name, or an entry's with size and quant", "the variant and its entry",
            params=[name, _query_param("size", {"type": "string"}), _query_param("quant", {"type": "string"})],
            errors=(*admin, "404"))},
        "/v1/admin/replicas": {"get": _op("This gateway's routing table", "the table", errors=admin)},
        "/v1/admin/status": {"get": _op("The whole cluster at a glance", "the status", errors=admin)},
        "/v1/admin/keys": {
            "post": _op("Create an API key; the answer holds its token, shown this once", "the key and its token",
                        _key_request(), errors=(*admin, "413"), ok_status="201"),
            "get": _op("API keys (never their tokens)", "a list", errors=admin)},
        "/v1/admin/keys/{id}": {"delete": _op("Revoke an API key", "deleted", params=[key_id],
                                              errors=(*admin, "404"))},
        "/v1/admin/pulls": {
            "post": _op("Pre-fetch a model's weights onto nodes", "the pull", _pull_request(),
                        errors=(*admin, "404", "409", "413"), ok_status="201"),
            "get": _op("Pulls and each node's progress", "a list", errors=admin)},
        "/v1/admin/pulls/{id}": {
            "get": _op("One pull", "the pull", params=[pull_id], errors=(*admin, "404")),
            "delete": _op("Withdraw a pull (the weights stay cached)", "deleted", params=[pull_id],
                          errors=(*admin, "404"))},
        "/v1/admin/prometheus/sd": {"get": _op("Prometheus http_sd targets of the cluster", "target groups",
                                               errors=admin, ok_schema={"type": "array"})},
        "/v1/admin/adapters": {"post": _adapters(),
                               "get": _op("LoRA adapters, where each is loaded and the engines' refusals", "a list",
                                          errors=admin)},
        "/v1/admin/adapters/{name}": {"delete": _op("Remove a LoRA adapter (unloaded from every replica)", "deleted",
                                                    params=[name], errors=(*admin, "404"))},
        "/healthz": {"get": {"summary": "Liveness and sync state (never needs a key)", "security": [],
                             "responses": {"200": {"description": "ok"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nebula gateway", "version": __version__,
                 "description": "OpenAI- and Anthropic-compatible inference and Nebula's admin API. Errors use "
                                "OpenAI's shape, Anthropic's on /v1/messages."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API key; not needed while no key exists"},
                                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                              "description": "The same key, as Anthropic's clients send it"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
                    "type": {"const": "error"}, "error": {
                        "type": "object", "required": ["type", "message"],
                        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}},
        },
        "security": [{"bearer": []}, {"x-api-key": []}],
    }


def openapi_route() -> web.RouteDef:
    body = json.dumps(openapi_document()).encode()

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return web.get("/openapi.json", openapi)
