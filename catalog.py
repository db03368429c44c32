"""What the server can serve: the lip-sync model in use and the prepared avatars.

One :class:`Catalog` per server: it picks the model (:func:`select_model`), loads the
``--avatar_id`` avatar at start-up and any other prepared avatar the first time an
``/offer`` names it (off the event loop), and keeps one model factory per avatar, so
the avatar is per session. MuseTalk serves only the avatar it was started with (its
latents and masks are prepared per avatar by ``musetalk.prepare``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import avatar as avatar_mod

log = logging.getLogger(__name__)


def select_model(args) -> tuple[str, str]:
    """Pick the lip-sync model: returns (name, reason)."""
    if args.model == "default":
        return "default", "requested with --model default"
    if args.model == "musetalk":
        return "musetalk", "requested with --model musetalk"
    if not args.models_dir.is_dir():
        return "default", f"no MuseTalk weights folder at {args.models_dir.resolve()}"
    try:
        import torch

        from musetalk.models import find_weights

        find_weights(args.models_dir, args.musetalk_version, unet=getattr(args, "musetalk_unet", None) is None)
    except FileNotFoundError as e:
        return "default", f"MuseTalk weights incomplete: {str(e).splitlines()[0]}"
    if not torch.cuda.is_available():
        return "default", "no CUDA device (MuseTalk on CPU is far below real time; force it with --model musetalk)"
    return "musetalk", f"weights at {args.models_dir} and CUDA device {torch.cuda.get_device_name(0)}"


class Catalog:
    """The model and the avatars of one server.

    Args:
        args: server options (``model``, ``models_dir``, ``avatar_id``, ``avatars_dir``,
            ``l``, ``r`` and MuseTalk's).
    Raises:
        FileNotFoundError, ValueError: the ``--avatar_id`` avatar or the model's
            weights cannot be loaded (the server stops with the message).
    """

    def __init__(self, args: Any) -> None:
        self.args = args
        self.model_name, reason = select_model(args)
        log.info("model: %s (%s)", self.model_name, reason)
        if args.avatar_id == avatar_mod.DEFAULT_AVATAR_ID:
            avatar = avatar_mod.ensure_default_avatar(args.avatars_dir)
        else:
            avatar = avatar_mod.load_avatar(args.avatar_id, args.avatars_dir)
        # avatar id -> (avatar, per-session model factory)
        self._loaded: dict[str, tuple[Any, Callable[[], Any]]] = {args.avatar_id: (avatar, self._model_factory(avatar))}

    def _model_factory(self, avatar: Any) -> Callable[[], Any]:
        a = self.args
        if self.model_name == "musetalk":
            from musereal import musetalk_model_factory

            return musetalk_model_factory(a, avatar)
        from visememodel import VisemeWarpModel

        return lambda: VisemeWarpModel(avatar, lookahead_ms=a.r * 20, lookbehind_ms=a.l * 20)

    def avatar_ids(self) -> list[str]:
        """The prepared avatars' ids (and the one the server started with)."""
        return sorted(set(avatar_mod.list_avatars(self.args.avatars_dir)) | {self.args.avatar_id})

    async def setup(self, avatar_id: Any = None) -> tuple[Any, Callable[[], Any]]:
        """(avatar, model factory) for ``avatar_id`` (None: ``--avatar_id``), loading
        a prepared avatar once, off the event loop.

        Raises:
            ValueError: not a prepared avatar (the message lists those that are), one
                that cannot be loaded, or any other than ``--avatar_id`` under MuseTalk.
        """
        key = self.args.avatar_id if avatar_id is None else avatar_id
        if isinstance(key, str) and key in self._loaded:
            return self._loaded[key]
        available = self.avatar_ids()
        if not isinstance(key, str) or key not in available:
            raise ValueError(f"unknown avatar {str(key)[:40]!r}; prepared: {', '.join(available)}")
        if self.model_name == "musetalk":
            raise ValueError(f"MuseTalk serves only the avatar it was started with ({self.args.avatar_id})")
        loop = asyncio.get_running_loop()
        try:
            avatar = await loop.run_in_executor(None, avatar_mod.load_avatar, key, self.args.avatars_dir)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ValueError(f"avatar {key!r} cannot be loaded: {e}") from e
        self._loaded[key] = (avatar, self._model_factory(avatar))
        return self._loaded[key]
