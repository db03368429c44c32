"""WHEP (draft-ietf-wish-whep): viewers of a session, status codes, and a WHEP player in Chromium.

- Secondary tracks (webrtc.JoinPoint) join a running session at the next slot: the
  same pts for the same unit, the same A/V pairing, and the session's metrics and
  playback events stay the primary's.
- An aiortc WHEP player (client.WhepViewer) of a speaking session: >= 20 fps, audio,
  the speech at the same moment as the session's own peer; DELETE ends the viewer
  and not the session, and so does a viewer that vanishes; ``POST /whep`` without
  an id starts a session of its own.
- Every refusal: 415, 404 (session, resource), 400, 405 + Allow, 503 beyond
  --max_viewers, OPTIONS.
- ``-m browser``: the ``whip-whep`` package's WHEPClient (web/vendor) in headless
  Chromium plays ``/whep/<id>`` and ``/whep``: frames decoded at >= 20 fps, audio.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest

from clock import SessionClock, video_pts
from conftest import FakeAvatar, SPEECH_RMS, wait_until
from events import PlaybackTracker
from metrics import Metrics
from playout import MediaUnit, PlayoutBuffer
from webrtc import TRACK_CHUNK, AvatarAudioTrack, AvatarVideoTrack, JoinPoint

SDP = {"Content-Type": "application/sdp"}


# -- tracks: a second pair joins with the same pts --------------------------------------
def _worker():
    av = FakeAvatar(4)
    playout = PlayoutBuffer(av.frame, len(av), capacity=200)
    for k in range(150):  # unit k: video value k, audio value 100 * k (one slot each)
        playout.put(MediaUnit(np.full((32, 32, 3), k % 250, np.uint8), np.full(640, 100 * k, np.int16), 0))
    chunks = []
    playback = PlaybackTracker(lambda event: None)
    on_chunk = playback.on_chunk
    playback.on_chunk = lambda *a: (chunks.append(a[-1]), on_chunk(*a))
    worker = SimpleNamespace(clock=SessionClock(), playout=playout, metrics=Metrics().session("t"),
                             options=SimpleNamespace(drop_threshold_ms=200), stopped=False, playback=playback)
    return worker, chunks


async def _read(track, n):
    return [await track.recv() for _ in range(n)]


def test_a_second_pair_of_tracks_joins_with_the_same_pts_and_units():
    worker, chunks = _worker()
    pv, pa = AvatarVideoTrack(worker), AvatarAudioTrack(worker)

    async def run():
        primary = asyncio.gather(_read(pv, 20), _read(pa, 40))
        await asyncio.sleep(0.2)  # the viewer arrives ~5 slots into the session
        join = JoinPoint()
        viewer = await asyncio.gather(_read(AvatarVideoTrack(worker, join), 8), _read(AvatarAudioTrack(worker, join), 16))
        return await primary, viewer

    (p_video, p_audio), (v_video, v_audio) = asyncio.run(run())
    by_pts = {f.pts: int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in p_video}
    first = v_video[0].pts
    assert first >= video_pts(4), "the viewer starts at the current slot, not at slot 0"
    assert [f.pts for f in v_video] == [first + i * video_pts(1) for i in range(8)]
    for f in v_video:  # the same unit at the same pts (the frame is the unit's video)
        assert int(f.to_ndarray(format="rgb24")[0, 0, 0]) == by_pts[f.pts]
        assert by_pts[f.pts] == f.pts // video_pts(1)
    # Pairing: the first audio chunk belongs to the first video frame's slot.
    assert v_audio[0].pts / 48000 == pytest.approx(first / 90000)
    p_level = {f.pts: float(f.to_ndarray().astype(np.float32).mean()) for f in p_audio}
    for f in v_audio[1:]:  # the same unit's audio (past the resampler's first-chunk warm-up)
        assert f.pts % TRACK_CHUNK == 0
        assert float(f.to_ndarray().astype(np.float32).mean()) == pytest.approx(p_level[f.pts], abs=2.0)
    # The session's figures and playback events count the primary's media only.
    assert worker.metrics.frames_sent == 20 and worker.metrics.audio_chunks_sent == 40
    assert chunks == list(range(40))


# -- an aiortc WHEP player against a real server ----------------------------------------
async def _offer(pc=None) -> str:
    from aiortc import RTCPeerConnection

    pc = pc or RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def _fps(rec) -> float:
    t = rec.video_arrival
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0


def _first_loud(rec, n0=0) -> float | None:
    for i in range(n0, len(rec.audio)):
        if float(np.sqrt(np.mean(rec.audio[i] ** 2))) > SPEECH_RMS:
            return rec.audio_arrival[i]
    return None


def test_whep_viewer_plays_the_session_and_delete_ends_only_the_viewer(server):
    onsets, fps, audio, deleted, again, alive, gone = asyncio.run(_run_viewers(server))
    assert all(o is not None for o in onsets), f"speech reached every viewer: {onsets}"
    assert max(onsets) - min(onsets) < 0.15, f"the viewers hear the speech at the same moment: {onsets}"
    assert min(fps) >= 20, fps
    assert min(audio) > 100, audio  # 20 ms frames over > 3 s
    assert deleted == 200 and again == 404
    assert gone, "a viewer whose peer went away is dropped without a DELETE"
    assert alive >= 18, f"the session's own peer kept receiving after both viewers left ({alive} frames in 1 s)"


async def _run_viewers(server):
    from client import AvatarClient, WhepViewer

    async with AvatarClient(server.url) as peer:
        await asyncio.wait_for(peer.first_video.wait(), 10)
        viewers = [WhepViewer(server.url, peer.sessionid, peer.token) for _ in range(2)]
        for v in viewers:
            await v.connect()
        await asyncio.wait_for(asyncio.gather(*(v.first_video.wait() for v in viewers)), 10)
        clients = (peer, *viewers)
        n0 = [len(c.received.audio) for c in clients]
        await peer.say("Hello there. Two viewers watch me speak through WHEP.")

        async def all_loud():
            return all(_first_loud(c.received, n) is not None for c, n in zip(clients, n0))

        await wait_until(all_loud, 10)
        await asyncio.sleep(2.5)
        onsets = [_first_loud(c.received, n) for c, n in zip(clients, n0)]
        fps = [_fps(v.received) for v in viewers]
        audio = [len(v.received.audio) for v in viewers]
        deleted = await viewers[0].delete()
        again = await viewers[0].delete()
        viewers[0].resource = None
        # The second viewer vanishes without a DELETE: its resource goes, the session stays.
        await viewers[1].pc.close()

        async def viewer_gone():
            return await viewers[1].delete() == 404

        gone = await wait_until(viewer_gone, 8)
        frames = len(peer.received.video_t)
        await asyncio.sleep(1.0)
        alive = len(peer.received.video_t) - frames  # frames in the second after the viewer went
        viewers[1].resource = None
        for v in viewers:
            await v.close()
        return onsets, fps, audio, deleted, again, alive, gone


def test_post_whep_without_a_session_id_starts_a_talking_session(server):
    """... and keeps it past --connect_timeout (5 s): the resource that owns its session
    is watched by sessions.py, not closed by the WHEP watchdog as 'never connected'."""
    from client import WhepViewer

    async def run():
        v = WhepViewer(server.url)
        t0 = time.monotonic()
        await v.connect()
        await asyncio.wait_for(v.first_video.wait(), 10)
        sid = v.sessionid
        listed = sid[:8] in server.status()["sessions"]
        n0 = len(v.received.audio)
        async with v.http.post(server.url + "/human", json={"sessionid": sid, "text": "Hello from WHEP.",
                                                              "type": "echo"}, headers=v._auth()) as r:
            said = r.status

        async def loud():
            return _first_loud(v.received, n0) is not None

        spoke = await wait_until(loud, 10)
        await asyncio.sleep(max(0.0, 6.5 - (time.monotonic() - t0)))  # past --connect_timeout 5 s
        frames = len(v.received.video_t)
        await asyncio.sleep(0.5)
        held = sid[:8] in server.status()["sessions"] and len(v.received.video_t) - frames >= 5
        deleted = await v.delete()
        v.resource = None
        await asyncio.sleep(0.3)
        gone = sid[:8] not in server.status()["sessions"]
        await v.close()
        return listed, said, spoke, held, deleted, gone

    listed, said, spoke, held, deleted, gone = asyncio.run(run())
    assert listed and said == 200 and spoke, "a plain WHEP player gets a session that speaks"
    assert held, "the session of POST /whep still runs and sends after --connect_timeout"
    assert deleted == 200 and gone, "DELETE of its resource ends the session"


def test_whep_refusals(server):
    from client import AvatarClient

    async def run():
        out = {}
        offer = await _offer()
        async with AvatarClient(server.url) as peer, aiohttp.ClientSession() as http:
            base = f"{server.url}/whep/{peer.sessionid}"

            async def post(url, data, headers):
                async with http.post(url, data=data, headers=headers) as r:
                    return r.status, (await r.json(content_type=None)) if r.status >= 400 else await r.text(), r.headers

            out["type"] = await post(base, offer, {"Content-Type": "application/json"})
            out["unknown"] = await post(f"{server.url}/whep/{'0' * 32}", offer, SDP)
            out["bad"] = await post(base, "v=0\r\nnot an offer", SDP)
            out["empty"] = await post(base, "", SDP)
            made = [await post(base, await _offer(), SDP) for _ in range(4)]  # --max_viewers 4 (default)
            out["made"] = [m[0] for m in made]
            out["full"] = await post(base, await _offer(), SDP)
            location = made[0][2]["Location"]
            async with http.patch(server.url + location, data="a=candidate:1 1 udp 1 127.0.0.1 9 typ host",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as r:
                out["patch"] = r.status, r.headers.get("Allow", "")
            async with http.options(base) as r:
                out["options"] = r.status, r.headers.get("Accept-Post", "")
            async with http.delete(f"{server.url}/whep/{peer.sessionid}/nosuchviewer") as r:
                out["delete_unknown"] = r.status
            for m in made:
                async with http.delete(server.url + m[2]["Location"]) as r:
                    assert r.status == 200
            out["after"] = (await post(base, await _offer(), SDP))[0]
        return out

    out = asyncio.run(run())
    assert out["type"][0] == 415 and "application/sdp" in out["type"][1]["msg"]
    assert out["unknown"][0] == 404 and "unknown session" in out["unknown"][1]["msg"]
    assert out["bad"][0] == 400 and "offer" in out["bad"][1]["msg"]
    assert out["empty"][0] == 400
    assert out["made"] == [201] * 4
    assert out["full"][0] == 503 and "4 WHEP viewers" in out["full"][1]["msg"]
    assert out["patch"][0] == 405 and "DELETE" in out["patch"][1] and "PATCH" not in out["patch"][1]
    assert out["options"] == (204, "application/sdp")
    assert out["delete_unknown"] == 404
    assert out["after"] == 201, "a viewer's slot is free again after its DELETE"


# -- the whip-whep package's WHEP client in headless Chromium -----------------------------
# A player POSTs to /whep (a new session; its resource is /whep/<id>/<id>), a second
# one to /whep/<id>; both are measured over the same seconds with getStats.
WHEP_JS = """async ({seconds, settle}) => {
  const {WHEPClient} = await import('/web/vendor/whip-whep/whep.js');
  const play = async (path) => {
    const pc = new RTCPeerConnection();
    pc.addTransceiver('video', {direction: 'recvonly'});
    pc.addTransceiver('audio', {direction: 'recvonly'});
    const video = document.createElement('video');
    video.muted = true; video.autoplay = true; video.playsInline = true;
    document.body.appendChild(video);
    pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
    const whep = new WHEPClient();
    await whep.view(pc, location.origin + path);
    return {pc, whep};
  };
  const stats = async (pc) => {
    let v = 0, a = 0;
    (await pc.getStats()).forEach(s => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') v = s.framesDecoded || 0;
      if (s.type === 'inbound-rtp' && s.kind === 'audio') a = s.packetsReceived || 0;
    });
    return [v, a];
  };
  const first = await play('/whep');
  const sid = first.whep.resourceURL.pathname.split('/')[2];
  const second = await play('/whep/' + sid);
  const players = [first, second];
  const deadline = performance.now() + 10000;
  for (const p of players)
    while ((await stats(p.pc))[0] === 0 && performance.now() < deadline) await new Promise(r => setTimeout(r, 50));
  await new Promise(r => setTimeout(r, settle * 1000));  // past the encoders' first-second ramp
  const s0 = await Promise.all(players.map(p => stats(p.pc))); const t0 = performance.now();
  await new Promise(r => setTimeout(r, seconds * 1000));
  const s1 = await Promise.all(players.map(p => stats(p.pc))); const t1 = performance.now();
  const out = players.map((p, i) => ({fps: (s1[i][0] - s0[i][0]) / ((t1 - t0) / 1000), audio: s1[i][1] - s0[i][1],
                                      first: s0[i][0], resource: p.whep.resourceURL.pathname}));
  await second.whep.stop(); await first.whep.stop();
  return out;
}"""


@pytest.mark.browser
def test_whip_whep_client_in_chromium_plays_whep(server, whep_page):
    own, viewer = whep_page.evaluate(WHEP_JS, {"seconds": 3, "settle": 1})
    sid = own["resource"].split("/")[2]
    assert own["resource"] == f"/whep/{sid}/{sid}" and viewer["resource"].startswith(f"/whep/{sid}/")
    for player in (own, viewer):
        assert player["first"] > 0, f"Chromium decoded video: {player}"
        assert player["fps"] >= 20, player
        assert player["audio"] >= 75, player  # 20 ms packets over 3 s


@pytest.fixture
def whep_page(server):
    from test_browser import CHROMIUM, CHROMIUM_FLAGS, _require_browser

    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(server.url + "/web/vendor/whip-whep/whep.js")  # any page of the WHEP endpoint's origin
        yield page
        browser.close()


# -- offers without candidates, publishers' offers (webrtc.check_offer) ------------------------
def test_check_offer_modes_for_whep_and_whip():
    from webrtc import check_offer

    async def offers():
        from aiortc import RTCPeerConnection

        from client import MicrophoneTrack, Received

        pc = RTCPeerConnection()
        pc.addTransceiver(MicrophoneTrack(Received()).track, direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        send = pc.localDescription.sdp
        await pc.close()
        return await _offer(), send

    recv, send = asyncio.run(offers())
    bare = "\r\n".join(line for line in recv.split("\r\n") if not line.startswith("a=candidate"))
    check_offer(recv)
    with pytest.raises(ValueError, match="no UDP ICE candidate"):
        check_offer(bare)  # /offer: candidates required
    check_offer(bare, candidates=False)  # WHEP: a player that POSTs before gathering
    check_offer(send, send=True)  # WHIP: the publisher sends audio
    with pytest.raises(ValueError, match="receives neither"):
        check_offer(send)
    with pytest.raises(ValueError, match="sends no audio"):
        check_offer(recv, send=True)


# -- access control and limits on a server with --api_key and --max_viewers 1 ------------------
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    from client import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("keyed"), "--max_session", "2", "--api_key", "k1",
                        "--max_viewers", "1", "--video_codec", "h264")
    yield srv
    srv.stop()


def test_whep_needs_the_sessions_token_and_bounds_viewers(keyed_server):
    from client import AvatarClient

    url = keyed_server.url

    async def run():
        out = {}
        async with AvatarClient(url, api_key="k1") as peer, aiohttp.ClientSession() as http:
            await asyncio.wait_for(peer.first_video.wait(), 10)
            base = f"{url}/whep/{peer.sessionid}"
            offer = await _offer()

            async def post(target, data, auth=None):
                headers = {**SDP, **({"Authorization": f"Bearer {auth}"} if auth else {})}
                async with http.post(target, data=data, headers=headers) as r:
                    return r.status, r.headers.get("Location")

            out["none"] = (await post(base, offer))[0]
            out["wrong"] = (await post(base, offer, "not-the-token"))[0]
            out["new_without_key"] = (await post(f"{url}/whep", offer))[0]
            out["huge"] = (await post(base, offer + "a=x-padding:" + "x" * 70000 + "\r\n", peer.token))[0]
            out["token"], location = await post(base, offer, peer.token)
            out["second"] = (await post(base, await _offer(), "k1"))[0]  # the API key works too
            async with http.delete(url + location) as r:
                out["delete_without"] = r.status
            async with http.delete(url + location, headers={"Authorization": f"Bearer {peer.token}"}) as r:
                out["delete"] = r.status
        return out

    out = asyncio.run(run())
    assert (out["none"], out["wrong"], out["new_without_key"]) == (401, 401, 401)
    assert out["huge"] == 413
    assert out["token"] == 201 and out["second"] == 503  # --max_viewers 1
    assert (out["delete_without"], out["delete"]) == (401, 200)


def test_parallel_viewers_keep_the_limit_and_viewers_get_the_video_codec(keyed_server):
    """--max_viewers 1 with three POSTs at once: one viewer, two 503s (the place is held
    from before the first await); the viewer's answer puts --video_codec (h264) first;
    OPTIONS /whep needs no key (a preflight has none); a malformed Origin is a 403."""
    from client import AvatarClient
    from test_codec import first_video_codec

    url = keyed_server.url

    async def run():
        out = {}
        async with AvatarClient(url, api_key="k1") as peer, aiohttp.ClientSession() as http:
            await asyncio.wait_for(peer.first_video.wait(), 10)
            offers = [await _offer() for _ in range(3)]

            async def post(offer):
                headers = {**SDP, "Authorization": f"Bearer {peer.token}"}
                async with http.post(f"{url}/whep/{peer.sessionid}", data=offer, headers=headers) as r:
                    return r.status, await r.text(), r.headers.get("Location")

            answers = await asyncio.gather(*(post(o) for o in offers))
            out["statuses"] = sorted(a[0] for a in answers)
            made = [a for a in answers if a[0] == 201]
            out["codec"] = first_video_codec(made[0][1]) if made else None
            for _, _, location in made:
                async with http.delete(url + location, headers={"Authorization": f"Bearer {peer.token}"}):
                    pass
            async with http.options(f"{url}/whep") as r:
                out["options"] = r.status, r.headers.get("Accept-Post")
            async with http.get(f"{url}/config", headers={"Origin": "http://["}) as r:
                out["bad_origin"] = r.status
        return out

    out = asyncio.run(run())
    assert out["statuses"] == [201, 503, 503], out["statuses"]
    assert out["codec"] == "video/H264", out["codec"]
    assert out["options"] == (204, "application/sdp")
    assert out["bad_origin"] == 403


# -- wish.Resources.close: a failing hook still closes the peer -------------------------------
def test_a_failing_close_hook_still_closes_the_peer_and_the_other_hooks_run():
    from aiortc import RTCPeerConnection

    import wish

    async def run():
        registry = SimpleNamespace(sessions={})
        resources = wish.Resources(registry, SimpleNamespace(connect_timeout=5.0, peer_timeout=4.0))
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendonly")
        r = wish.Resource("whep", SimpleNamespace(id="s" * 32, closed=False), pc)
        ran = []

        async def broken():
            raise RuntimeError("a hook that fails")

        async def after():
            ran.append(True)

        r.on_close += [broken, after]
        resources.add(r)
        await resources.close(r, "deleted")
        await resources.close_all()
        return pc.connectionState, ran, resources.by_id

    state, ran, left = asyncio.run(run())
    assert state == "closed" and ran == [True] and not left
