"""chat.py against tests/fake_openai.py: sentences as tokens stream in, cancellation
closes the HTTP stream, bounded history of what was played, errors within limits."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import time
import wave

import pytest

import chat
import tts
from chat import ChatClient, ChatError, Conversation, SentenceSplitter
from conftest import wait_for
from fake_openai import FakeOpenAI, split_tokens

THREE = "Hello there, nice to see you. I am the avatar, and I talk! Is that not something?"
# how a reply of THREE is spoken: its first piece cut at the first clause mark
THREE_PIECES = ["Hello there,", "nice to see you.", "I am the avatar, and I talk!", "Is that not something?"]


@pytest.fixture
def fake():
    with FakeOpenAI(reply=THREE) as f:
        yield f


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def seen(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return False


# -- sentence splitting of a stream ------------------------------------------------------


def test_splitter_marks_are_those_of_tts():
    for name in ("_WESTERN_END", "_CJK_END", "_CLOSERS"):
        if hasattr(tts, name):
            assert getattr(chat, name) == getattr(tts, name), name


TEXTS = [
    THREE,
    'Pi is 3.14 and the site is example.com. He said "no!" Then left?! Fine; ok.',
    "Wait... what?\nA new line. 「你好。」我很好！你呢？好的；再见",
    "No end mark at all",
    "   ",
    "Trailing space. ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_splitter_streamed_equals_split_sentences(text):
    rnd = random.Random(7)
    for _ in range(30):
        sp, out, i = SentenceSplitter(120), [], 0
        while i < len(text):
            n = rnd.randint(1, 6)
            out += sp.feed(text[i : i + n])
            i += n
        out += sp.flush()
        assert out == tts.split_sentences(text, 120)


def test_splitter_sentence_out_once_the_next_token_shows_it_ended():
    sp = SentenceSplitter()
    assert sp.feed("Hello there.") == []  # "there.com"? not known yet
    assert sp.feed(" I") == ["Hello there."]
    assert sp.feed(" am 3.") == []
    assert sp.feed("14 m") == []
    assert sp.feed(" tall!") == []
    assert sp.flush() == ["I am 3.14 m tall!"]
    assert SentenceSplitter().feed("好。然") == ["好。"]  # CJK: no space needed


def test_splitter_cuts_a_long_sentence_at_clauses_before_it_ends():
    clauses = [f"clause number {i} goes on for a while" for i in range(12)]
    text = ", ".join(clauses) + "."
    sp, early = SentenceSplitter(120), []
    for tok in split_tokens(text):
        early += sp.feed(tok)
    rest = sp.flush()
    assert len(early) >= 2  # out before the sentence ended
    assert all(len(p) <= 120 and p.endswith(",") for p in early)
    assert " ".join(early + rest).split() == text.split()
    # no clause mark at all: cut between words
    words = " ".join(f"word{i}" for i in range(60))
    sp = SentenceSplitter(50)
    pieces = [p for tok in split_tokens(words) for p in sp.feed(tok)] + sp.flush()
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces) == words



def test_splitter_first_piece_is_cut_early_then_sentences_as_usual():
    text = "This is sentence number one of a long story. And this is the second one."
    sp, pieces = SentenceSplitter(120, first_words=4), []
    fed = ""
    for tok in split_tokens(text):
        got = sp.feed(tok)
        fed += tok
        if got and not pieces:
            assert fed.split()[:4] == "This is sentence number".split() and len(fed.split()) == 5  # at the 5th token
        pieces += got
    pieces += sp.flush()
    assert pieces == ["This is sentence number", "one of a long story.", "And this is the second one."]
    # the first clause mark comes before the word count
    sp = SentenceSplitter(120, first_words=6)
    assert [p for tok in split_tokens("Well, I think so. Yes.") for p in sp.feed(tok)] + sp.flush() == [
        "Well,", "I think so.", "Yes."]
    # a first sentence shorter than the count is cut at its end, as without first_words
    sp = SentenceSplitter(120, first_words=6)
    assert [p for tok in split_tokens("Hi there. How are you today my friend?") for p in sp.feed(tok)] + sp.flush() == [
        "Hi there.", "How are you today my friend?"]
    with pytest.raises(ValueError):
        SentenceSplitter(120, first_words=-1)

# -- streaming ---------------------------------------------------------------------------


def test_sentences_come_out_as_tokens_arrive(fake):
    fake.token_delay = 0.04
    got: list[tuple[float, str]] = []

    async def go():
        client = ChatClient(fake.url, model="m")
        async with client.reply([], "Hi") as reply:
            async for sentence in reply:
                got.append((time.monotonic(), sentence))
        await client.aclose()
        return reply

    reply = run(go())
    assert [s for _, s in got] == THREE_PIECES
    rec = fake.chats[-1]
    assert rec.completed and not rec.closed_early
    t_last_token = rec.sent[-1][0]
    assert got[0][0] < t_last_token - 0.3, "first sentence only after the last token"
    # the first piece is out right after the token that shows its clause ended (" nice"),
    # the first sentence right after the token that shows it ended (" I")
    for piece, shown_by in ((0, " nice"), (1, " I")):
        k = next(i for i, (_, tok) in enumerate(rec.sent) if tok == shown_by)
        assert rec.sent[k][0] <= got[piece][0] < rec.sent[k][0] + 0.2
    assert reply.first_token_s < reply.first_sentence_s < t_last_token - rec.t_start
    assert reply.text == THREE


def test_cancelling_the_consumer_closes_the_stream(fake):
    fake.reply = " ".join(f"Sentence {i} is here." for i in range(30))
    fake.token_delay = 0.03

    async def go():
        client = ChatClient(fake.url, model="m")
        reply = client.reply([], "Talk")
        first = asyncio.get_running_loop().create_future()

        async def consume():
            async for s in reply:  # no async with: cancellation alone must close it
                if not first.done():
                    first.set_result(s)

        task = asyncio.create_task(consume())
        await first
        task.cancel()
        t_cancel = time.monotonic()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.05)
        n_text = len(reply.text)
        await asyncio.sleep(0.3)
        assert len(reply.text) == n_text, "tokens read after the cancel"
        await client.aclose()
        return t_cancel, reply

    t_cancel, reply = run(go())
    rec = fake.chats[-1]
    assert wait_for(lambda: rec.closed_early, 2), "the fake never saw the connection close"
    assert rec.t_closed - t_cancel < 0.5
    n_sent = len(rec.sent)
    time.sleep(0.2)
    assert len(rec.sent) == n_sent < len(rec.tokens)
    assert not rec.completed and reply.cancelled


def test_cancel_and_early_exit_close_the_stream(fake):
    fake.reply = " ".join(f"Sentence {i} is here." for i in range(30))
    fake.token_delay = 0.03

    async def go():
        client = ChatClient(fake.url, model="m")
        # cancel() from another coroutine while the consumer waits: iteration just ends
        reply = client.reply([], "one")
        got = []

        async def consume():
            async for s in reply:
                got.append(s)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.01)
        reply.cancel()
        await asyncio.wait_for(task, 1)  # ends without an exception
        await reply.aclose()
        assert await seen(lambda: fake.chats[-1].closed_early)  # the fake's own thread sees it
        # leaving async with early (break)
        async with client.reply([], "two") as reply2:
            async for s in reply2:
                break
        assert await seen(lambda: fake.chats[-1].closed_early)
        await client.aclose()

    run(go())
    assert len(fake.chats) == 2 and all(not r.completed for r in fake.chats)


def test_request_carries_system_prompt_history_and_key(fake, monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", "sk-test-123")
    conv = Conversation()
    conv.record_user("What is your name?")
    turn = conv.assistant_turn()
    turn.add("I am Ava.")
    turn.sentence_started(0)
    turn.finish()

    async def go():
        client = ChatClient(fake.url.removesuffix("/v1"), model=None, system_prompt="Be brief.")
        assert client.url == fake.url  # /v1 added to a bare host:port
        prompt = conv.record_user("And your age?")
        async with client.reply(conv.history, prompt) as reply:
            sentences = [s async for s in reply]
        await client.aclose()
        return sentences

    assert run(go()) == THREE_PIECES
    rec = fake.chats[-1]
    assert rec.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "I am Ava."},
        {"role": "user", "content": "And your age?"},
    ]
    assert rec.body["model"] == "fake-model"  # asked GET /models
    assert rec.body["stream"] is True
    assert rec.authorization == "Bearer sk-test-123"
    # a per-session system prompt replaces the client's; without a key, a dummy one
    monkeypatch.delenv("LLM_API_KEY")
    conv2 = Conversation(system_prompt="Be a pirate.")

    async def go2():
        client = ChatClient(fake.url, model="m", system_prompt="Be brief.")
        async with client.reply(conv2.history, conv2.record_user("Hi")) as reply:
            [s async for s in reply]
        await client.aclose()

    run(go2())
    assert fake.chats[-1].messages[0] == {"role": "system", "content": "Be a pirate."}
    assert [m["role"] for m in fake.chats[-1].messages] == ["system", "user"]
    assert fake.chats[-1].authorization == f"Bearer {chat.DUMMY_API_KEY}"


# -- errors ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def collect(client: ChatClient) -> list[str]:
    try:
        async with client.reply([], "hi") as reply:
            return [s async for s in reply]
    finally:
        await client.aclose()


def raises_chat_error(client: ChatClient, within: float) -> ChatError:
    t0 = time.monotonic()
    with pytest.raises(ChatError) as info:
        run(collect(client))
    assert time.monotonic() - t0 < within
    return info.value


def test_unreachable_endpoint():
    url = f"http://127.0.0.1:{free_port()}/v1"
    err = raises_chat_error(ChatClient(url, model="m"), 3)
    assert err.kind == "unreachable" and err.http_status == 502
    assert url in str(err) and "unreachable" in str(err)
    err = raises_chat_error(ChatClient(url), 3)  # the model look-up fails the same way
    assert err.kind == "unreachable"


def test_error_status(fake):
    fake.status = 500
    err = raises_chat_error(ChatClient(fake.url, model="m"), 3)
    assert (err.kind, err.status, err.http_status) == ("status", 500, 502)
    assert "HTTP 500" in str(err) and "fake error 500" in str(err)
    fake.status = 404
    assert raises_chat_error(ChatClient(fake.url, model="m"), 3).status == 404


def test_slow_first_token_times_out(fake):
    fake.first_token_delay = 5.0
    err = raises_chat_error(ChatClient(fake.url, model="m", first_token_timeout=0.5), 1.5)
    assert (err.kind, err.http_status) == ("timeout", 504)
    assert "no token within 0.5 s" in str(err)
    assert wait_for(lambda: fake.chats[-1].closed_early, 2)


def test_stalled_stream_times_out(fake):
    fake.tokens = ["Hello.", " I", " stall", " here"]
    fake.token_delay = 5.0
    got = []

    async def go():
        client = ChatClient(fake.url, model="m", token_timeout=0.4)
        try:
            async with client.reply([], "hi") as reply:
                async for s in reply:
                    got.append(s)
        finally:
            await client.aclose()

    with pytest.raises(ChatError) as info:
        run(go())
    assert info.value.kind == "timeout" and "stopped sending for 0.4 s" in str(info.value)
    assert got == []  # "Hello." waits for the " I" that never came in time


def test_silent_server_times_out():
    """A server that accepts the connection and never answers the request."""

    async def go():
        writers = []
        server = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = ChatClient(f"http://127.0.0.1:{port}/v1", model="m", first_token_timeout=0.5)
        t0 = time.monotonic()
        try:
            with pytest.raises(ChatError) as info:
                await collect(client)
        finally:
            for w in writers:
                w.close()
            server.close()
            await server.wait_closed()
        return info.value, time.monotonic() - t0

    err, took = run(go())
    assert err.kind == "timeout" and took < 1.5


# -- history -----------------------------------------------------------------------------


def play(conv: Conversation, user: str, sentences: list[str], played=None, cut=0.0) -> str:
    conv.record_user(user)
    turn = conv.assistant_turn()
    for s in sentences:
        i = turn.add(s)
        turn.sentence_started(i)
    return turn.finish(played, cut)


def test_history_records_only_what_was_played():
    conv = Conversation()
    assert play(conv, "Q1", ["One two three.", "Four five six seven."]) == "One two three. Four five six seven."
    # cut in the 2nd sentence, half of its 4 words played; the 3rd never played
    recorded = play(conv, "Q2", ["Alpha beta.", "Gamma delta epsilon zeta.", "Eta theta."], played=1, cut=0.5)
    assert recorded == "Alpha beta. Gamma delta" + chat.CUT_MARK
    assert conv.history == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "One two three. Four five six seven."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": recorded},
    ]
    # nothing played: the question stays pending and is asked again with the next one
    assert play(conv, "Q3", ["Never heard."], played=0, cut=0.0) == ""
    assert len(conv.history) == 4 and conv.pending == "Q3"
    assert conv.record_user("Q4") == "Q3\nQ4"
    # CJK (no spaces): cut by characters
    assert chat._truncate("我们今天去公园散步。", 0.5) == "我们今天去"


def test_finish_at_playback_position():
    conv = Conversation()
    conv.record_user("Q")
    turn = conv.assistant_turn()
    for s in ["One two.", "Three four five six.", "Seven."]:
        turn.add(s)
    turn.sentence_started(0, 0.0, 1.0)
    turn.sentence_started(1, 1.2, 2.0)  # 1.0-1.2 s: a pause between sentences
    # 2.2 s: half-way through sentence 1 (4 words -> 2); sentence 2 never started
    assert turn.finish_at(2.2) == "One two. Three four" + chat.CUT_MARK
    assert turn.finish_at(9.9) == turn.recorded  # a second finish changes nothing
    # unknown timings: offsets follow on, durations from the text at SPEECH_CHARS_PER_S
    conv.record_user("Q2")
    turn = conv.assistant_turn()
    for i, s in enumerate(["A b c d e f g h i j.", "K l m n o p q r s t."]):
        turn.add(s)
        turn.sentence_started(i)
    d0 = len("A b c d e f g h i j.") / chat.SPEECH_CHARS_PER_S
    assert turn.finish_at(d0 + 0.5 * d0) == "A b c d e f g h i j. K l m n o" + chat.CUT_MARK
    # played to the end
    conv.record_user("Q3")
    turn = conv.assistant_turn()
    turn.sentence_started(turn.add("Done."), 0.0, 0.5)
    assert turn.finish_at(0.5) == "Done."


def test_history_is_bounded():
    conv = Conversation(max_turns=3, max_chars=10_000, system_prompt="S")
    for i in range(5):
        play(conv, f"Q{i}", [f"A{i}."])
    assert conv.history[0] == {"role": "system", "content": "S"}
    assert [m["content"] for m in conv.history[1:]] == ["Q2", "A2.", "Q3", "A3.", "Q4", "A4."]
    conv = Conversation(max_turns=100, max_chars=100)
    for i in range(10):
        play(conv, "Q" * 20, ["A" * 19 + "."])
    body = conv.history
    assert sum(len(m["content"]) for m in body) <= 100
    assert len(body) == 4 and [m["role"] for m in body] == ["user", "assistant"] * 2  # whole turns dropped


def test_open_turn_is_finished_by_the_next_user_text():
    conv = Conversation()
    conv.record_user("Q1")
    turn = conv.assistant_turn()
    turn.sentence_started(turn.add("First."))
    turn.add("Second, never started.")
    assert conv.record_user("Q2") == "Q2"
    assert turn.recorded == "First." + chat.CUT_MARK
    with pytest.raises(ValueError):
        conv.record_user("  ")
    with pytest.raises(ValueError):
        Conversation().assistant_turn()


# -- the fake's audio routes, through the openai client -----------------------------------


def test_fake_speech_and_transcription(fake):
    import openai

    async def go():
        api = openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=0)
        wav = await api.audio.speech.create(model="tts-1", voice="alloy", input="one two three", response_format="wav")
        pcm = await api.audio.speech.create(model="tts-1", voice="alloy", input="one two three", response_format="pcm")
        text = await api.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav.content, "audio/wav"))
        with pytest.raises(openai.BadRequestError):
            await api.audio.speech.create(model="tts-1", voice="alloy", input="x")  # mp3 by default
        await api.close()
        return wav.content, pcm.content, text.text

    wav, pcm, text = run(go())
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.readframes(w.getnframes()) == pcm
    assert len(pcm) == 2 * int(3 * 0.25 * 24000)  # 3 words of tone, s16le
    assert text == fake.transcript
    assert fake.speeches[0].body["input"] == "one two three"
    rec = fake.transcriptions[0]
    assert rec.fields["model"] == "whisper-1" and rec.filename == "q.wav" and rec.audio == wav
