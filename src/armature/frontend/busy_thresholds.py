"""``GET`` / ``POST /busy_threshold``: read and change a model's busy thresholds at runtime
(Dynamo's endpoint and field names). A field left out keeps its value; ``null`` clears it."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from armature.frontend.errors import ApiError, from_decode_error

if TYPE_CHECKING:
    from armature.frontend.models import ModelManager, ServedModel


class BusyThresholdRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    active_decode_blocks_threshold: Annotated[float, Meta(gt=0.0)] | None = None
    active_prefill_tokens_threshold: Annotated[int, Meta(ge=0)] | None = None
    active_prefill_tokens_threshold_frac: Annotated[float, Meta(gt=0.0)] | None = None


# Wire name -> BusyThresholds field.
_FIELDS = {
    "active_decode_blocks_threshold": "active_decode_blocks",
    "active_prefill_tokens_threshold": "active_prefill_tokens",
    "active_prefill_tokens_threshold_frac": "active_prefill_tokens_frac",
}


def _body(model: ServedModel) -> dict[str, Any]:
    t = model.thresholds
    return {"model": model.name, **{wire: getattr(t, name) for wire, name in _FIELDS.items()}}


def threshold_list(models: list[ServedModel]) -> dict[str, Any]:
    shed = sorted((m for m in models if m.gate is not None and m.gate.can_shed), key=lambda m: m.name)
    return {"thresholds": [_body(m) for m in shed]}


async def set_thresholds(manager: ModelManager, body: bytes) -> dict[str, Any]:
    try:
        raw = msgspec.json.decode(body)
        req = msgspec.convert(raw, BusyThresholdRequest)
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None
    model = manager.get(req.model)
    if model is None or model.gate is None or not model.gate.can_shed:
        raise ApiError(404, f"model '{req.model}' is not served here", param="model", code="model_not_found")
    thresholds = replace(model.thresholds)
    for wire, name in _FIELDS.items():
        if wire in raw:  # given, perhaps as null: set; left out: keep
            setattr(thresholds, name, getattr(req, wire))
    await manager.set_thresholds(model, thresholds)
    return _body(model)
