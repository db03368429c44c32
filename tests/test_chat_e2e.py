"""End to end: /human type "chat" against a fake OpenAI-compatible endpoint, app.py in a
subprocess, a real aiortc client: the reply is spoken sentence by sentence while the
tokens still stream, an interrupt closes the token stream, and the history holds only
what was played."""

import asyncio
import time

import pytest

from client import AvatarClient, ServerProcess
from conftest import loud_since
from fake_openai import FakeOpenAI

REPLY = ("Hello there, it is nice to meet you. I am the avatar of this server, and I answer in sentences. "
         "Each sentence is spoken as soon as it is complete. The rest of the reply keeps streaming meanwhile. "
         "This is the fifth sentence of a long answer. And this one is the last.")


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(reply=REPLY, first_token_delay=0.2, token_delay=0.12) as f:
        yield f


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, fake):
    srv = ServerProcess(tmp_path_factory.mktemp("chat"), "--llm_url", fake.url, "--llm_model", "fake-model")
    yield srv
    srv.stop()


async def events_until(c, kind, n=1, timeout=20.0):
    end = time.monotonic() + timeout
    while len(c.events_of(kind)) < n and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return c.events_of(kind)


def test_reply_starts_before_the_last_token_and_records_what_played(chat_server, fake):
    async def run():
        async with AvatarClient(chat_server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            await c.open_ws()
            n0 = len(c.received.audio)
            r = await c.post("/human", {"sessionid": c.sessionid, "text": "Who are you?", "type": "chat"})
            assert r["code"] == 0, r
            texts = await events_until(c, "text", 1)
            t_first_text = next(t for t, e in c.events if e["type"] == "text")
            assert await asyncio.wait_for(_loud(c, n0), 10)
            await events_until(c, "playback_finished", 1, timeout=40)
            # a second question: the history sent with it holds the first answer
            await c.post("/human", {"sessionid": c.sessionid, "text": "Thanks!", "type": "chat"})
            await events_until(c, "playback_started", 2)
            await c.interrupt()
            return c, r, texts, t_first_text

    c, r, texts, t_first_text = asyncio.run(run())
    first = fake.chats[0]
    assert first.messages[-1] == {"role": "user", "content": "Who are you?"}
    # the reply's first piece (cut at its first clause mark), then whole sentences
    assert texts[0]["text"] == "Hello there," and texts[0]["utterance"] == r["utterance"]
    # the first sentence played while the LLM was still sending the rest
    assert t_first_text < first.sent[-1][0] - 1.0, (t_first_text - first.t_start, first.sent[-1][0] - first.t_start)
    finished = c.events_of("playback_finished")[0]
    assert not finished["interrupted"] and finished["playback_position"] > 5.0
    second = fake.chats[1].messages
    assert [m["role"] for m in second[-3:]] == ["user", "assistant", "user"]
    assert second[-2]["content"] == REPLY  # played in full: recorded in full


def test_interrupt_mid_reply_closes_the_token_stream_and_keeps_only_what_played(chat_server, fake):
    async def run():
        async with AvatarClient(chat_server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            await c.open_ws()
            n_chats = len(fake.chats)
            await c.post("/human", {"sessionid": c.sessionid, "text": "Tell me everything.", "type": "chat"})
            await events_until(c, "text", 1)
            await asyncio.sleep(1.0)
            t_int = time.monotonic()
            await c.interrupt()
            await events_until(c, "playback_finished", 1)
            await asyncio.sleep(1.0)
            rec = c.received
            n_after = len(rec.audio)
            await asyncio.sleep(0.5)
            quiet = not await loud_since(rec, n_after)
            await c.post("/human", {"sessionid": c.sessionid, "text": "Go on.", "type": "chat"})
            await events_until(c, "playback_started", 2)
            await c.interrupt()
            return c, n_chats, t_int, quiet

    c, n, t_int, quiet = asyncio.run(run())
    record = fake.chats[n]
    assert record.closed_early and not record.completed, "the LLM stream was not closed"
    assert record.t_closed - t_int < 0.5
    assert len(record.sent) < len(record.tokens)  # no more tokens were read
    finished = c.events_of("playback_finished")[0]
    assert finished["interrupted"] and 0.3 < finished["playback_position"] < 4.0
    assert quiet
    # the history sent with the next question holds only the played part, marked as cut
    assistant = fake.chats[n + 1].messages[-2]
    assert assistant["role"] == "assistant" and assistant["content"].endswith("…")
    played = assistant["content"][:-1]
    assert 0 < len(played) < len(REPLY) / 2 and REPLY.startswith(played)


def test_chat_without_an_llm_is_400_naming_the_option(server):
    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            return await c.post("/human", {"sessionid": c.sessionid, "text": "Hi", "type": "chat"})

    r = asyncio.run(run())
    assert r["code"] == -1 and "--llm_url" in r["msg"]


async def _loud(c, n0):
    while not await loud_since(c.received, n0):
        await asyncio.sleep(0.05)
    return True
