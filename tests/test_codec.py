"""Video codec preference (issue #10): the server sends the preferred codec when the
client offers it, and whatever the client offers when it offers only one."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.sdp import SessionDescription

from client import AvatarClient
from config import parse_args
from webrtc import AUTO_VIDEO_CODEC, VIDEO_CODEC_MIME, prefer_video_codec

BOTH = ("video/VP8", "video/H264")


def capabilities(mimes) -> list:
    """aiortc's video capabilities for ``mimes`` in that order, RTX kept."""
    caps = RTCRtpSender.getCapabilities("video").codecs
    ordered = [c for m in mimes for c in caps if c.mimeType == m]
    return ordered + [c for c in caps if c.mimeType == "video/rtx"]


def first_video_codec(sdp: str) -> str:
    video = next(m for m in SessionDescription.parse(sdp).media if m.kind == "video")
    return video.rtp.codecs[0].mimeType


async def client_offer(mimes) -> str:
    """An aiortc viewer's offer whose video section carries ``mimes`` in that order."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("video", direction="recvonly").setCodecPreferences(capabilities(mimes))
        pc.addTransceiver("audio", direction="recvonly")
        offer = await pc.createOffer()
        return offer.sdp
    finally:
        await pc.close()


async def server_answer(offer_sdp: str, preference: str) -> str:
    """What AvatarServer.open_session does with the video track, up to the answer."""
    pc = RTCPeerConnection()
    try:
        sender = pc.addTrack(VideoStreamTrack())
        prefer_video_codec(pc, sender, preference, offer_sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        return (await pc.createAnswer()).sdp
    finally:
        await pc.close()


@pytest.mark.parametrize("preference", ["auto", "vp8", "h264"])
def test_answer_puts_the_preferred_codec_first_when_both_are_offered(preference):
    expected = VIDEO_CODEC_MIME[AUTO_VIDEO_CODEC if preference == "auto" else preference]

    async def run():
        # The client lists the other codec first: the server's preference must win.
        offer = await client_offer(sorted(BOTH, key=lambda m: m == expected))
        assert first_video_codec(offer) != expected
        return await server_answer(offer, preference)

    answer = asyncio.run(run())
    assert first_video_codec(answer) == expected
    codecs = {c.mimeType for m in SessionDescription.parse(answer).media if m.kind == "video" for c in m.rtp.codecs}
    assert set(BOTH) <= codecs and "video/rtx" in codecs  # the other codec and RTX are still answered


@pytest.mark.parametrize("only", BOTH)
@pytest.mark.parametrize("preference", ["auto", "vp8", "h264"])
def test_a_client_offering_one_codec_gets_it_whatever_the_preference(only, preference):
    async def run():
        return await server_answer(await client_offer([only]), preference)

    assert first_video_codec(asyncio.run(run())) == only


def test_unknown_preference_is_refused_and_the_option_is_checked():
    async def run():
        pc = RTCPeerConnection()
        try:
            with pytest.raises(ValueError, match="vp8"):
                prefer_video_codec(pc, pc.addTrack(VideoStreamTrack()), "av1", await client_offer(BOTH))
        finally:
            await pc.close()

    asyncio.run(run())
    assert parse_args([]).video_codec == "auto"
    assert parse_args(["--video_codec", "h264"]).video_codec == "h264"
    with pytest.raises(SystemExit):
        parse_args(["--video_codec", "av1"])


class CodecClient(AvatarClient):
    """An AvatarClient whose video transceiver offers only ``mimes`` (in that order)."""

    def __init__(self, base_url: str, mimes) -> None:
        super().__init__(base_url, keep_media=False)
        add = self.pc.addTransceiver

        def add_restricted(track_or_kind, **kwargs):
            transceiver = add(track_or_kind, **kwargs)
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(capabilities(mimes))
            return transceiver

        self.pc.addTransceiver = add_restricted


@pytest.mark.parametrize("mimes", [["video/VP8"], ["video/H264"], ["video/H264", "video/VP8"]],
                         ids=["vp8-only", "h264-only", "h264-first"])
def test_clients_receive_video_in_the_codec_they_can_take(server, mimes):
    """Default --video_codec (auto): a one-codec client streams in its codec; a client
    preferring H.264 but offering both gets the cheaper one."""
    expected = mimes[0] if len(mimes) == 1 else VIDEO_CODEC_MIME[AUTO_VIDEO_CODEC]

    async def run():
        async with CodecClient(server.url, mimes) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            n0 = len(c.received.video_arrival)
            await asyncio.sleep(1.0)
            return first_video_codec(c.pc.remoteDescription.sdp), len(c.received.video_arrival) - n0

    codec, frames = asyncio.run(run())
    assert codec == expected
    assert frames >= 15, f"only {frames} video frames decoded in 1 s ({codec})"  # 25 fps, loose under load
