"""HTTP API: bad input gets a clear 4xx, and never disturbs a streaming session."""

import asyncio
import io
import json

import aiohttp
import soundfile as sf

from client import AvatarClient, ServerProcess
from conftest import tone


def wav_bytes(pcm, sr=16000):
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="WAV")
    return buf.getvalue()


async def post_json(http, url, body, raw=None):
    data = raw if raw is not None else json.dumps(body)
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def post_form(http, url, fields):
    form = aiohttp.FormData()
    for k, v in fields.items():
        if isinstance(v, bytes):
            form.add_field(k, v, filename="x.wav")
        else:
            form.add_field(k, v)
    async with http.post(url, data=form) as r:
        return r.status, await r.json()


def test_bad_input_gets_4xx_and_other_sessions_keep_streaming(server):
    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            sid, u = c.sessionid, server.url
            async with aiohttp.ClientSession() as http:
                cases = {
                    "malformed json": await post_json(http, u + "/human", None, raw="{not json"),
                    "json not an object": await post_json(http, u + "/human", None, raw="[1, 2]"),
                    "offer without sdp": await post_json(http, u + "/offer", {"type": "offer"}),
                    "offer with garbage sdp": await post_json(http, u + "/offer", {"sdp": "v=0\r\nnonsense", "type": "offer"}),
                    "unknown session": await post_json(http, u + "/human", {"sessionid": "nope", "text": "hi"}),
                    "missing session": await post_json(http, u + "/interrupt_talk", {}),
                    "empty text": await post_json(http, u + "/human", {"sessionid": sid, "text": "  "}),
                    "overlong text": await post_json(http, u + "/human", {"sessionid": sid, "text": "a" * 5000}),
                    "chat without llm": await post_json(http, u + "/human", {"sessionid": sid, "text": "hi", "type": "chat"}),
                    "undecodable upload": await post_form(http, u + "/humanaudio", {"sessionid": sid, "file": b"\x00garbage" * 100}),
                    "empty upload": await post_form(http, u + "/humanaudio", {"sessionid": sid, "file": b""}),
                    "oversized upload": await post_form(http, u + "/humanaudio", {"sessionid": sid, "file": b"\x00" * (3 * 1024 * 1024)}),
                    "upload for unknown session": await post_form(http, u + "/humanaudio", {"sessionid": "nope", "file": wav_bytes(tone(0.5))}),
                    "not multipart": await post_json(http, u + "/humanaudio", {"sessionid": sid}),
                }
                n_before = len(c.received.video)
                await asyncio.sleep(1.0)
                n_after = len(c.received.video)
                good = await post_form(http, u + "/humanaudio", {"sessionid": sid, "file": wav_bytes(tone(0.5))})
            return cases, n_after - n_before, good

    cases, frames_in_1s, good = asyncio.run(run())
    expected = {
        "malformed json": 400, "json not an object": 400, "offer without sdp": 400,
        "offer with garbage sdp": 400, "unknown session": 404, "missing session": 400,
        "empty text": 400, "overlong text": 413, "chat without llm": 400,
        "undecodable upload": 400, "empty upload": 400, "oversized upload": 413,
        "upload for unknown session": 404, "not multipart": 400,
    }
    for name, (status, body) in cases.items():
        assert status == expected[name], f"{name}: {status} {body}"
        assert body["code"] == -1 and len(body["msg"]) > 5, f"{name}: {body}"
    assert frames_in_1s >= 20, f"session stalled during bad input: {frames_in_1s} frames in 1 s"
    assert good[0] == 200 and good[1]["code"] == 0 and good[1]["duration_s"] == 0.5


def test_max_session_enforced_and_sessions_torn_down(tmp_path):
    srv = ServerProcess(tmp_path, "--max_session", "1")
    try:
        async def run():
            a = AvatarClient(srv.url)
            await a.connect()
            await asyncio.wait_for(a.first_video.wait(), 20)
            assert len(a.sessionid) == 32  # 128-bit hex
            b = AvatarClient(srv.url)
            try:
                await b.connect()
                raise AssertionError("second session accepted")
            except RuntimeError as e:
                assert "server full" in str(e)
            finally:
                await b.close()
            assert len(srv.status()["sessions"]) == 1
            await a.close()
            for _ in range(100):
                if not srv.status()["sessions"]:
                    break
                await asyncio.sleep(0.1)
            assert srv.status()["sessions"] == {}
            # the freed slot can be used again
            async with AvatarClient(srv.url) as c:
                await asyncio.wait_for(c.first_video.wait(), 20)

        asyncio.run(run())
    finally:
        srv.stop()


def test_metrics_exposed(server):
    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            await c.push_audio(wav_bytes(tone(0.6)))
            await asyncio.sleep(1.5)
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/metrics") as r:
                    return c.sessionid, await r.text()

    sid, text = asyncio.run(run())
    assert f'avatar_video_frames_sent_total{{session="{sid}"}}' in text
    for stage in ("features", "model", "composite", "sent"):
        assert f'avatar_stage_latency_seconds_count{{session="{sid}",stage="{stage}"}}' in text
    assert "avatar_video_frames_dropped_total" in text and "avatar_video_frames_late_total" in text
