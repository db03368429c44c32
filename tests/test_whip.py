"""WHIP (RFC 9725): ingest into a session, push from one server to another, and a browser publisher.

- Ingest: an aiortc publisher (client.MicrophoneTrack) POSTs to ``/whip/<id>``; the
  session's avatar speaks what it sends; refusals 415, 404, 400 (an offer that
  sends no audio), 409 (a second publisher), 405 + Allow for PATCH; DELETE frees
  the publisher's place.
- Push: server A (``--whip_url`` at a stub that answers ``307`` to server B's
  ``/whip/<id>``) pushes its session on connection; B's avatar says what A's says;
  A's session ending DELETEs B's resource. ``POST /push`` errors: unreachable and a
  4xx from the endpoint are answered 502 and published as ``error`` events; a
  non-http URL is 400; ``stop`` DELETEs the resource.
- ``-m browser``: ``@eyevinn/whip-web-client`` (web/vendor) in headless Chromium
  publishes its fake microphone (a speech file) to ``/whip/<id>``: the avatar
  speaks it at an aiortc viewer.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from conftest import SPEECH_RMS, tone, wait_until

SDP = {"Content-Type": "application/sdp"}


def _loud_since(rec, n0) -> int:
    return sum(float(np.sqrt(np.mean(a * a))) > SPEECH_RMS for a in rec.audio[n0:])


async def _publisher_offer(send_audio: bool = True):
    """An aiortc publisher (a MicrophoneTrack) and its offer."""
    from aiortc import RTCPeerConnection

    from client import MicrophoneTrack, Received

    pc = RTCPeerConnection()
    mic = MicrophoneTrack(Received())
    if send_audio:
        pc.addTransceiver(mic.track, direction="sendonly")
    else:
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, mic


def test_whip_ingest_speaks_the_publishers_audio_and_refuses_what_it_must(server):
    from aiortc import RTCSessionDescription

    from client import AvatarClient

    async def run():
        out = {}
        async with AvatarClient(server.url) as peer, aiohttp.ClientSession() as http:
            await asyncio.wait_for(peer.first_video.wait(), 10)
            url = f"{server.url}/whip/{peer.sessionid}"

            async def post(target, sdp, headers=SDP):
                async with http.post(target, data=sdp, headers=headers) as r:
                    body = await r.json(content_type=None) if r.status >= 400 else await r.text()
                    return r.status, body, r.headers

            pc, mic = await _publisher_offer()
            out["type"] = await post(url, pc.localDescription.sdp, {"Content-Type": "text/plain"})
            out["unknown"] = await post(f"{server.url}/whip/{'0' * 32}", pc.localDescription.sdp)
            silent, _ = await _publisher_offer(send_audio=False)
            out["recvonly"] = await post(url, silent.localDescription.sdp)
            await silent.close()
            status, answer, headers = await post(url, pc.localDescription.sdp)
            out["created"] = status, headers.get("Content-Type"), headers.get("Location", "")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            second, _ = await _publisher_offer()
            out["second"] = await post(url, second.localDescription.sdp)
            async with http.patch(server.url + headers["Location"], data="a=end-of-candidates",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as r:
                out["patch"] = r.status, r.headers.get("Allow", "")
            await asyncio.sleep(0.5)  # connected
            n0 = len(peer.received.audio)
            mic.say(np.concatenate([tone(1.5, 220, 0.3), np.zeros(8000, np.float32)]))

            async def loud():
                return _loud_since(peer.received, n0) >= 20

            out["spoke"] = await wait_until(loud, 10)
            async with http.delete(server.url + headers["Location"]) as r:
                out["deleted"] = r.status
            async with http.delete(server.url + headers["Location"]) as r:
                out["deleted_again"] = r.status
            out["after"] = (await post(url, second.localDescription.sdp))[0]
            await pc.close()
            await second.close()
        return out

    out = asyncio.run(run())
    assert out["type"][0] == 415 and "application/sdp" in out["type"][1]["msg"]
    assert out["unknown"][0] == 404 and "unknown session" in out["unknown"][1]["msg"]
    assert out["recvonly"][0] == 400 and "sends no audio" in out["recvonly"][1]["msg"]
    status, content_type, location = out["created"]
    assert status == 201 and content_type == "application/sdp" and location.startswith("/whip/")
    assert out["second"][0] == 409 and "publisher" in out["second"][1]["msg"]
    assert out["patch"][0] == 405 and "DELETE" in out["patch"][1]
    assert out["spoke"], "the avatar spoke the WHIP publisher's audio"
    assert (out["deleted"], out["deleted_again"]) == (200, 404)
    assert out["after"] == 201, "after DELETE the session takes a new publisher"


# -- push: server A -> (307 stub) -> server B ---------------------------------------------
class RedirectStub:
    """A WHIP endpoint that answers every POST with ``307`` to ``target`` (RFC 9725
    section 4.6 load balancing), in a thread with its own event loop."""

    def __init__(self) -> None:
        self.target: str | None = None
        self.requests: list[tuple[str, str | None]] = []  # (method, Authorization)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def whip(request: web.Request) -> web.Response:
            self.requests.append((request.method, request.headers.get("Authorization")))
            if self.target is None:
                return web.json_response({"msg": "no target"}, status=404)
            return web.Response(status=307, headers={"Location": self.target})

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/whip", whip)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/whip"
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        started.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def stub():
    s = RedirectStub()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pusher(tmp_path_factory, stub):
    from client import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("pusher"), "--max_session", "4", "--whip_url", stub.url,
                        "--whip_token", "stub-token")
    yield srv
    srv.stop()


def test_whip_push_to_another_server_speaks_there_and_deletes_at_the_end(server, pusher, stub):
    from client import AvatarClient

    async def run():
        out = {}
        async with AvatarClient(server.url) as b:
            await asyncio.wait_for(b.first_video.wait(), 10)
            stub.target = f"{server.url}/whip/{b.sessionid}"
            a = AvatarClient(pusher.url)
            await a.connect()  # --whip_url: A pushes its session once its peer connects
            await asyncio.wait_for(a.first_video.wait(), 10)
            await asyncio.sleep(1.0)
            n0 = len(b.received.audio)
            await a.say("Hello there. The other avatar says what I say.")

            async def loud():
                return _loud_since(b.received, n0) >= 25

            out["spoke"] = await wait_until(loud, 15)
            await a.close()  # A's session ends: its push DELETEs B's resource
            probe, _ = await _publisher_offer()

            async def free():
                async with aiohttp.ClientSession() as http:
                    async with http.post(stub.target, data=probe.localDescription.sdp, headers=SDP) as r:
                        out["after"] = r.status
                        if r.status == 201:
                            async with http.delete(server.url + r.headers["Location"]):
                                pass
                return out["after"] == 201

            out["freed"] = await wait_until(free, 10)
            await probe.close()
        return out

    out = asyncio.run(run())
    assert stub.requests and stub.requests[0] == ("POST", "Bearer stub-token")
    assert out["spoke"], "B's avatar spoke what A's said (A -> 307 -> B's WHIP ingest)"
    assert out["freed"], f"A's DELETE freed B's publisher place (last POST: {out.get('after')})"


def test_push_route_errors_are_answered_and_published(server, pusher):
    from client import AvatarClient

    async def run():
        out = {}
        async with AvatarClient(server.url) as b, AvatarClient(pusher.url) as a:
            await asyncio.wait_for(asyncio.gather(a.first_video.wait(), b.first_video.wait()), 10)
            await a.open_ws()
            await asyncio.sleep(0.5)  # the --whip_url push (the stub has no target now) has failed
            sid = a.sessionid
            out["unreachable"] = await a.post("/push", {"sessionid": sid, "url": "http://127.0.0.1:9/whip"})
            out["refused"] = await a.post("/push", {"sessionid": sid, "url": f"{server.url}/whip/{'0' * 32}"})
            out["scheme"] = await a.post("/push", {"sessionid": sid, "url": "ftp://example.org/whip"})
            out["ok"] = await a.post("/push", {"sessionid": sid, "url": f"{server.url}/whip/{b.sessionid}"})
            out["stop"] = await a.post("/push", {"sessionid": sid, "stop": True})
            out["stop_again"] = await a.post("/push", {"sessionid": sid, "stop": True})
            await asyncio.sleep(0.3)
            out["errors"] = [e["msg"] for e in a.events_of("error")]
            probe, _ = await _publisher_offer()
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{server.url}/whip/{b.sessionid}", data=probe.localDescription.sdp,
                                     headers=SDP) as r:
                    out["freed"] = r.status
                    if r.status == 201:
                        async with http.delete(server.url + r.headers["Location"]):
                            pass
            await probe.close()
        return out

    out = asyncio.run(run())
    assert out["unreachable"]["code"] == -1 and "unreachable" in out["unreachable"]["msg"]
    assert out["refused"]["code"] == -1 and "answered 404" in out["refused"]["msg"]
    assert out["scheme"]["code"] == -1 and "http" in out["scheme"]["msg"]
    assert out["ok"]["code"] == 0 and out["ok"]["resource"].startswith(server.url + "/whip/")
    assert out["stop"]["stopped"] is True and out["stop_again"]["stopped"] is False
    assert any("unreachable" in m for m in out["errors"]) and any("answered 404" in m for m in out["errors"]), \
        out["errors"]
    assert out["freed"] == 201, "stop DELETEd the resource on B"


# -- @eyevinn/whip-web-client in headless Chromium ------------------------------------------
WHIP_JS = """async ({path}) => {
  const {WHIPClient} = await import('/web/vendor/eyevinn-whip-web-client/whip-client.js');
  const stream = await navigator.mediaDevices.getUserMedia({audio: true, video: false});
  const client = new WHIPClient({endpoint: location.origin + path, opts: {debug: false, iceServers: []}});
  await client.ingest(stream);
  const resource = await client.getResourceUrl();
  return {resource};
}"""


@pytest.mark.browser
def test_eyevinn_whip_client_in_chromium_makes_the_avatar_speak(server, tmp_path):
    from test_browser import CHROMIUM, CHROMIUM_FLAGS, _require_browser

    _require_browser()
    from playwright.sync_api import sync_playwright

    from client import AvatarClient
    from conftest import speech_input

    kind, wav = speech_input()
    if kind != "file":
        wav = tmp_path / "speech.wav"
        _espeak_wav(wav)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    peer = AvatarClient(server.url)

    def on_loop(coro, timeout=15):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    try:
        on_loop(peer.connect())
        on_loop(asyncio.wait_for(peer.first_video.wait(), 10))
        n0 = len(peer.received.audio)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                        args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={wav}"])
            page = browser.new_page()
            page.goto(server.url + "/web/vendor/whip-whep/whep.js")  # the endpoint's origin
            published = page.evaluate(WHIP_JS, {"path": f"/whip/{peer.sessionid}"})

            async def loud():
                return _loud_since(peer.received, n0) >= 25

            spoke = on_loop(wait_until(loud, 12), 20)
            browser.close()
    finally:
        on_loop(peer.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert f"/whip/{peer.sessionid}/" in published["resource"]
    assert spoke, "the avatar spoke the browser's microphone (WHIP)"


def _espeak_wav(path) -> None:
    import soundfile as sf

    from tts import make_tts

    tts = make_tts("espeak")
    pcm = np.concatenate([a for _, a in tts.sentences("Hello there. I am speaking into the microphone.")])
    sf.write(path, pcm, tts.sample_rate_out, subtype="PCM_16")


# -- review fixes (issue #11): races, hostile URLs, what an endpoint's answer may leak -------
async def _publisher_with_video_offer():
    """A publisher's offer with audio and video (as OBS sends)."""
    from aiortc import RTCPeerConnection, VideoStreamTrack

    from client import MicrophoneTrack, Received

    pc = RTCPeerConnection()
    pc.addTransceiver(MicrophoneTrack(Received()).track, direction="sendonly")
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


def _video_direction(sdp: str) -> str:
    from aiortc.sdp import SessionDescription

    return next(m for m in SessionDescription.parse(sdp).media if m.kind == "video").direction


def test_whip_ingest_one_publisher_under_parallel_posts_declines_video_and_a_second_microphone(server):
    """Three POSTs at once: one publisher, two 409s (the place is held before the first
    await). A publisher's video is declined (inactive: never decoded). A session whose
    own peer feeds the microphone ("mic": "lipsync") refuses a WHIP publisher (409)."""
    from client import AvatarClient, MicrophoneTrack, Received

    async def run():
        out = {}
        async with AvatarClient(server.url) as peer, aiohttp.ClientSession() as http:
            await asyncio.wait_for(peer.first_video.wait(), 10)
            url = f"{server.url}/whip/{peer.sessionid}"
            pcs = [await _publisher_with_video_offer() for _ in range(3)]

            async def post(pc):
                async with http.post(url, data=pc.localDescription.sdp, headers=SDP) as r:
                    return r.status, await r.text(), r.headers.get("Location")

            answers = await asyncio.gather(*(post(pc) for pc in pcs))
            out["statuses"] = sorted(a[0] for a in answers)
            made = [a for a in answers if a[0] == 201]
            out["video"] = _video_direction(made[0][1]) if made else None
            for _, _, location in made:
                async with http.delete(server.url + location):
                    pass
            for pc in pcs:
                await pc.close()
        mic_peer = AvatarClient(server.url)
        mic_peer.mic_track = MicrophoneTrack(Received()).track
        async with mic_peer, aiohttp.ClientSession() as http:
            await asyncio.wait_for(mic_peer.first_video.wait(), 10)
            pc, _ = await _publisher_offer()
            async with http.post(f"{server.url}/whip/{mic_peer.sessionid}", data=pc.localDescription.sdp,
                                 headers=SDP) as r:
                out["mic"] = r.status, await r.json(content_type=None)
            await pc.close()
        return out

    out = asyncio.run(run())
    assert out["statuses"] == [201, 409, 409], out["statuses"]
    assert out["video"] == "inactive", "the publisher's video is declined, not received and dropped"
    assert out["mic"][0] == 409 and "microphone" in out["mic"][1]["msg"], out["mic"]


class _Endpoints:
    """WHIP endpoints that misbehave, on this test's loop: ``/secret`` refuses with a
    body, ``/plain`` answers 201 as text/plain, ``/hop`` redirects to another origin
    (``localhost`` instead of ``127.0.0.1``) whose ``/record`` notes the Authorization."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)

    async def start(self) -> str:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append((request.path, request.headers.get("Authorization")))
            if request.path == "/secret":
                return web.Response(status=403, text="SECRET-INTERNAL-BODY")
            if request.path == "/plain":
                return web.Response(status=201, text="v=0", headers={"Location": "/plain/1"})
            if request.path == "/hop":
                return web.Response(status=307, headers={"Location": f"http://localhost:{self.port}/record"})
            return web.Response(status=404, text="no")

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"


def test_push_route_hostile_urls_parallel_pushes_and_what_answers_may_carry(server, pusher):
    from client import AvatarClient, free_port

    async def run():
        out = {}
        stub = _Endpoints()
        base = await stub.start()
        async with AvatarClient(server.url) as b, AvatarClient(pusher.url) as a:
            await asyncio.wait_for(asyncio.gather(a.first_video.wait(), b.first_video.wait()), 10)
            await asyncio.sleep(0.5)  # the --whip_url push at connection has ended
            await a.open_ws()
            sid = a.sessionid
            for name, url in (("bracket", "http://["), ("port", "https://h:99999/whip"),
                              ("rtmp_port", "rtmp://h:abc/app/s"), ("rtmp_range", "rtmp://h:99999/a/b")):
                out[name] = await a.post("/push", {"sessionid": sid, "url": url})
            out["secret"] = await a.post("/push", {"sessionid": sid, "url": f"{base}/secret"})
            out["plain"] = await a.post("/push", {"sessionid": sid, "url": f"{base}/plain"})
            out["hop"] = await a.post("/push", {"sessionid": sid, "url": f"{base}/hop", "token": "tok"})
            n0 = len(a.events_of("error"))
            out["rtmp"] = await a.post("/push", {"sessionid": sid, "url": f"rtmp://127.0.0.1:{free_port()}/live/k"})
            await asyncio.sleep(0.3)
            out["rtmp_events"] = [e for e in a.events_of("error")[n0:] if e.get("source") == "rtmp_push"]
            # Two pushes at once to B: one after the other, the second replaces the first.
            target = f"{server.url}/whip/{b.sessionid}"
            out["parallel"] = await asyncio.gather(*(a.post("/push", {"sessionid": sid, "url": target})
                                                     for _ in range(2)))
            out["stop"] = await a.post("/push", {"sessionid": sid, "stop": True})
            probe, _ = await _publisher_offer()

            async def free():
                async with aiohttp.ClientSession() as http:
                    async with http.post(target, data=probe.localDescription.sdp, headers=SDP) as r:
                        out["freed"] = r.status
                        if r.status == 201:
                            async with http.delete(server.url + r.headers["Location"]):
                                pass
                return out["freed"] == 201

            await wait_until(free, 5)
            await probe.close()
        await stub.runner.cleanup()
        return out, stub.seen

    out, seen = asyncio.run(run())
    for name in ("bracket", "port", "rtmp_port", "rtmp_range"):
        assert out[name]["code"] == -1 and "url" in out[name]["msg"], (name, out[name])
    assert out["secret"]["code"] == -1 and "answered 403" in out["secret"]["msg"]
    assert "SECRET" not in out["secret"]["msg"], "the endpoint's body stays in the server's log"
    assert out["plain"]["code"] == -1 and "Content-Type" in out["plain"]["msg"], out["plain"]
    assert ("/hop", "Bearer tok") in seen and ("/record", None) in seen, "the token stays with its origin"
    assert out["rtmp"]["code"] == -1 and len(out["rtmp_events"]) == 1, out["rtmp_events"]
    assert [r["code"] for r in out["parallel"]] == [0, 0], out["parallel"]
    assert out["stop"]["stopped"] is True and out["freed"] == 201, "no push was left behind on B"
