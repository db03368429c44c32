"""GET /config, /avatars, /stats and per-session avatars (the page's pickers)."""

import asyncio
import json
import urllib.request

import cv2
import numpy as np
import pytest

from client import AvatarClient, ServerProcess


@pytest.fixture(scope="module")
def two_avatars(tmp_path_factory):
    """A server whose avatars folder holds the default avatar and a mirrored copy ("mirror")."""
    import avatar as A

    work = tmp_path_factory.mktemp("routes")
    root = work / "avatars"
    default = A.ensure_default_avatar(root)
    image = work / "mirror.png"
    cv2.imwrite(str(image), np.ascontiguousarray(default.frame(0)[:, ::-1]))
    A.prepare_avatar(image, "mirror", root)
    srv = ServerProcess(work, "--ice_server", "stun:stun.example.org:3478",
                        "--ice_server", "turn:turn.example.org:3478,user,secret")
    yield srv
    srv.stop()


async def refusal(url: str, offer_extra: dict) -> str | None:
    """The message of an /offer carrying ``offer_extra`` that the server refuses (None if accepted)."""
    c = AvatarClient(url)
    c.offer_extra = offer_extra
    try:
        await c.connect()
        return None
    except RuntimeError as e:
        return str(e)
    finally:
        await c.close()


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_config_and_avatars(two_avatars):
    config = get(two_avatars.url + "/config")
    assert config["ice_servers"] == [{"urls": "stun:stun.example.org:3478"},
                                     {"urls": "turn:turn.example.org:3478", "username": "user", "credential": "secret"}]
    assert config["chat"] is False and config["api_key_required"] is False and config["avatar"] == "default"
    assert get(two_avatars.url + "/avatars") == {"avatars": ["default", "mirror"], "default": "default"}


def test_each_session_gets_the_avatar_it_asks_for_and_stats(two_avatars):
    async def first_frame(avatar):
        c = AvatarClient(two_avatars.url)
        c.offer_extra = {} if avatar is None else {"avatar": avatar}
        async with c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            stats = await c.get(f"/stats?sessionid={c.sessionid}")
            return c.received.first_frame_bgr, stats

    async def run():
        plain, stats = await first_frame(None)
        mirrored, _ = await first_frame("mirror")
        return plain, mirrored, stats, await refusal(two_avatars.url, {"avatar": "../etc"})

    plain, mirrored, stats, refused = asyncio.run(run())
    # the mirrored avatar is the default one flipped left-right (up to encoding noise)
    diff_same = np.abs(plain.astype(float) - mirrored[:, ::-1].astype(float)).mean()
    diff_other = np.abs(plain.astype(float) - mirrored.astype(float)).mean()
    assert diff_same < 6 and diff_other > 2 * diff_same, (diff_same, diff_other)
    assert stats["code"] == 0 and stats["connected"] is True and stats["frames_sent"] > 0
    assert "last_start_latency_ms" in stats
    assert refused is not None and "unknown avatar" in refused and "mirror" in refused


def test_voices_listed_and_validated_per_request(two_avatars):
    voices = get(two_avatars.url + "/voices")
    ids = [v["id"] for v in voices["voices"]]
    assert voices["engine"] == "espeak" and voices["default"] in ids and "en-us+f3" in ids

    async def run():
        c = AvatarClient(two_avatars.url)
        c.offer_extra = {"voice": "en-us+f3"}
        async with c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            good = await c.post("/human", {"sessionid": c.sessionid, "text": "Hi.", "type": "echo", "voice": "en-us"})
            bad = await c.post("/human", {"sessionid": c.sessionid, "text": "Hi.", "type": "echo", "voice": "klingon"})
        return good, bad, await refusal(two_avatars.url, {"voice": "klingon"})

    good, bad, offer_bad = asyncio.run(run())
    assert good["code"] == 0 and good["utterance"] == 1
    assert bad["code"] == -1 and "klingon" in bad["msg"] and "en-us" in bad["msg"]
    assert offer_bad is not None and "klingon" in offer_bad
