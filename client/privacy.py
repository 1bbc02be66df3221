"""Device-side clipping for user-level differential privacy: Flower's ``fixedclipping_mod``, on train messages only.

With run config ``dp = "client-fixed"`` the server sends the clipping norm in each train message and
adds the noise to the aggregate (server/privacy.py, docs/trust.md); the device clips its update's
change from what it was sent before it leaves. Flower's mod answers any message without a clipping
norm with an error, so it wraps the train function alone, and only when the run asks for it.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from shared.config import FederationConfig
from shared.methods import DpMode


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the run clips on the device; otherwise the message passes through."""
    if DpMode(FederationConfig.from_run_config(context.run_config).dp).clips_on_device:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
