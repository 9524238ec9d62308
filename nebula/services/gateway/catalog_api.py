"""`/v1/admin/catalog`: the model catalog as this gateway reads it ([catalog] files), and the resolution of a
load request that names a catalog entry instead of a source (`resolve_catalog`, called by the admin API's
load before the spec is parsed)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nebula.core.catalog import Catalog, CatalogModel, resolve_request
from nebula.core.model import validate_name
from nebula.errors import ValidationError
from nebula.services.http.errors import ApiError

CATALOG = web.AppKey("catalog", Catalog)
MAX_QUERY = 200


def catalog_of(app: web.Application) -> Catalog:
    """The app's catalog; an app built without one has an empty catalog."""
    return app.get(CATALOG) or Catalog()


def resolve_catalog(spec_json: object, catalog: Catalog) -> object:
    """The load body with a catalog name in `source` resolved (source, revision, task, max_model_len; `size`
    and `quant` consumed; `name` defaulting to the catalog name). Anything else passes unchanged, for
    ModelSpec.from_dict to judge. ValidationError (a 400 naming the field) for an unknown name, with the
    closest names, and for a task the entry contradicts."""
    return resolve_catalog_model(spec_json, catalog)[0]


def resolve_catalog_model(spec_json: object, catalog: Catalog) -> tuple[object, CatalogModel | None]:
    """`resolve_catalog`, with the variant it resolved to (None: the source named no catalog entry), whose
    `provenance` a profile's `derived` map can give for source, task and max_model_len."""
    if not isinstance(spec_json, dict):
        return spec_json, None
    return resolve_request(spec_json, catalog)


def model_json(m: CatalogModel) -> dict[str, Any]:
    return {"name": m.name, "entry": m.entry, "size": m.size, "quant": m.quant, "source": m.source,
            "revision": m.revision, "task": m.task.value, "max_model_len": m.max_model_len,
            "weights_gib": m.weights_gib, "note": m.note, "origin": m.origin}


async def list_catalog(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    if len(query) > MAX_QUERY:
        raise ApiError(400, f"q must be at most {MAX_QUERY} characters", param="q", code="invalid_value")
    entries = catalog_of(request.app).search(query.replace(",", " "))
    return web.json_response({"object": "list", "data": [e.to_dict() for e in entries]})


async def get_catalog_model(request: web.Request) -> web.Response:
    """One variant: `name` a variant's or an entry's name, ?size= and ?quant= choosing among the entry's."""
    catalog = catalog_of(request.app)
    name = validate_name(request.match_info["name"], "name")
    size, quant = request.query.get("size") or None, request.query.get("quant") or None
    try:
        model = catalog.resolve(name, size, quant)
    except ValidationError as e:
        if e.field == "source":  # no such entry: a 404 with the closest names
            raise ApiError(404, e.message, param="name", code="model_not_found") from None
        raise
    return web.json_response({"model": model_json(model), "entry": catalog.entries[model.entry].to_dict()})


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/admin/catalog", list_catalog), web.get("/v1/admin/catalog/{name}", get_catalog_model)]
