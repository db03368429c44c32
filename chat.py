"""Chat: a streamed conversation with any OpenAI-compatible LLM, sentence by sentence.

:class:`ChatClient` talks to a chat-completions endpoint through the ``openai``
library's ``AsyncOpenAI(base_url=...)``, which serves vLLM, Ollama, llama.cpp's
server and OpenAI alike. :meth:`ChatClient.reply` streams the answer and yields
*sentences* (:class:`SentenceSplitter`, the rules of :func:`tts.split_sentences`)
the moment each is complete, so speech starts long before the last token.
:class:`Conversation` keeps a session's bounded history and records of each reply
*only what was actually played*.

How a session uses it (one :class:`ChatClient` per server, one
:class:`Conversation` per session)::

    chat = ChatClient.from_options(args)           # None without --llm_url
    conv = Conversation()

    async def on_user_text(text):                  # /human type=chat, or a voice turn
        prompt = conv.record_user(text)            # merged with an unanswered one
        turn = conv.assistant_turn()
        try:
            async with chat.reply(conv.history, prompt) as reply:
                async for sentence in reply:       # ChatError may come from here
                    i = turn.add(sentence)
                    speak(sentence, on_start=lambda offset_s, duration_s, i=i:
                          turn.sentence_started(i, offset_s, duration_s))
        except ChatError as e:
            bus.publish({"type": "error", "msg": str(e)})

    on interrupt:          reply.cancel()          # closes the HTTP stream at once
    on playback_finished:  turn.finish_at(playback_position) if interrupted else turn.finish()

``offset_s`` is where the sentence starts within the utterance's audio and
``duration_s`` its length (from the TTS samples); both may be ``None`` (then the
sentence is taken to start where the previous one ended and to last
``len(text) / SPEECH_CHARS_PER_S``).

Errors: everything that goes wrong with the endpoint (unreachable, an HTTP error
status, no first token within ``first_token_timeout``, no next token within
``token_timeout``, a broken or empty stream) is one :class:`ChatError`;
``ChatError.http_status`` is 504 for a timeout and 502 otherwise, for an answer
given while the request is still open, else publish it as an ``error`` event.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import openai

from tts import split_sentences

__all__ = [
    "ChatClient",
    "ChatError",
    "ChatReply",
    "Conversation",
    "AssistantTurn",
    "SentenceSplitter",
    "add_arguments",
]

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}

MAX_SENTENCE_CHARS = 120  # a sentence longer than this is cut at a clause boundary (chars)
# A reply's first piece is cut early, at its first clause mark or after this many
# words, so that speech starts before the LLM has written a whole sentence and the
# TTS has voiced it (the "fast sentence fragment" of RealtimeTTS). 6 words: piper
# voices them in ~45 ms here, ~1.6 s of speech that covers the next piece's wait.
FIRST_PIECE_WORDS = 6
CONNECT_TIMEOUT_S = 5.0  # TCP/TLS connect to the endpoint (s)
FIRST_TOKEN_TIMEOUT_S = 20.0  # request sent -> first content token (s); a cold local model may be slow
TOKEN_TIMEOUT_S = 10.0  # longest gap between two tokens (s)
HISTORY_TURNS = 10  # user/assistant pairs kept per session
HISTORY_CHARS = 8000  # characters of history kept per session (the system prompt not counted)
SPEECH_CHARS_PER_S = 15.0  # speaking rate used when a sentence's duration is unknown (chars/s)
CUT_MARK = "…"  # appended to a reply recorded as cut off, so the model knows it was interrupted
DUMMY_API_KEY = "sk-no-key-required"  # sent when LLM_API_KEY is unset (local servers ignore it)
API_KEY_ENV = "LLM_API_KEY"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly talking avatar in a live voice conversation. Answer briefly, "
    "in plain spoken sentences: no markdown, no lists, no emoji."
)

# The sentence marks of tts.split_sentences (kept equal by tests/test_chat.py).
_WESTERN_END = ".!?;"  # ends a sentence when followed by whitespace
_CJK_END = "。！？；"  # ends a sentence wherever it appears
_CLOSERS = "\"'”’»)]}」』）】"  # closing quotes/brackets that stay with the sentence
_CLAUSE_WESTERN = ",:"  # clause marks, a boundary when followed by whitespace
_CLAUSE_CJK = "，、：；"  # clause marks, a boundary wherever they appear


# ---------------------------------------------------------------------------
# Sentences out of a token stream
# ---------------------------------------------------------------------------


def _settled_end(text: str) -> int:
    """Length of the longest prefix of ``text`` that ends at a sentence end no later
    text can move (``.!?;`` run + closers followed by whitespace, a CJK end run
    followed by anything, a line break); 0 when there is none."""
    end, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        i += 1
        if ch in "\r\n":
            end = i
        elif ch in _WESTERN_END or ch in _CJK_END:
            cjk = ch in _CJK_END
            while i < n and (text[i] in _WESTERN_END or text[i] in _CJK_END or text[i] in _CLOSERS):
                cjk = cjk or text[i] in _CJK_END
                i += 1
            if i < n and (cjk or text[i].isspace()):
                end = i
    return end


def _clause_cut(text: str, max_chars: int) -> int:
    """Where to cut an unfinished sentence longer than ``max_chars``: after its last
    clause mark that keeps the piece within ``max_chars`` (else after its first clause
    mark), else at the last space that does; 0 when the text gives no such place yet."""
    marks = [
        i + 1
        for i, ch in enumerate(text[:-1])
        if ch in _CLAUSE_CJK or (ch in _CLAUSE_WESTERN and text[i + 1].isspace())
    ]
    fitting = [q for q in marks if len(text[:q].strip()) <= max_chars]
    if fitting:
        return fitting[-1]
    if marks:
        return marks[0]
    spaces = [m.start() for m in re.finditer(r"\s", text) if len(text[: m.start()].strip()) <= max_chars]
    spaces = [q for q in spaces if text[:q].strip()]
    return spaces[-1] if spaces else 0


class SentenceSplitter:
    """:func:`tts.split_sentences` for text that arrives in pieces.

    :meth:`feed` returns the sentences completed by the new text: a sentence is
    complete once its end mark (``. ! ? ;`` and closing quotes) is followed by
    whitespace, at a CJK end mark (``。！？；``) once the next character is there,
    or at a line break. An unfinished sentence longer than ``max_chars`` is cut at
    its last clause boundary (``, :`` + whitespace, ``，、：``), else between words.
    :meth:`flush` returns the rest at the end of the stream. For text whose
    sentences are all within ``max_chars``, the pieces are exactly
    ``split_sentences(whole_text, max_chars)``, however the text was chunked.

    With ``first_words`` > 0 the first piece is cut early: at its first clause mark
    or after ``first_words`` whole words, unless its sentence ends first (the rest of
    that sentence is then the second piece).
    """

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS, first_words: int = 0) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
        if first_words < 0:
            raise ValueError(f"first_words must be >= 0, got {first_words!r}")
        self.max_chars = max_chars
        self.first_words = first_words
        self._buf = ""
        self._emitted = False

    def feed(self, text: str) -> list[str]:
        """Add streamed text; returns the sentences it completed (maybe none)."""
        self._buf += text
        out = self._first_piece() if self.first_words and not self._emitted else []
        out += self._sentences()
        self._emitted = self._emitted or bool(out)
        return out

    def _first_piece(self) -> list[str]:
        """The reply's first piece, ahead of its sentence end: the text up to the first
        clause mark (``, :`` + whitespace, ``，、：；``) or up to ``first_words`` whole
        words, whichever comes first; none while the buffer has neither (or already
        holds a sentence end, which :meth:`_sentences` cuts)."""
        if _settled_end(self._buf):
            return []
        words = 0
        for i, ch in enumerate(self._buf[:-1]):
            nxt = self._buf[i + 1]
            if ch in _CLAUSE_CJK or (ch in _CLAUSE_WESTERN and nxt.isspace()):
                cut = i + 1
            elif not ch.isspace() and nxt.isspace():
                words += 1
                if words < self.first_words:
                    continue
                cut = i + 1
            else:
                continue
            piece = self._buf[:cut].strip()
            if piece:
                self._buf = self._buf[cut:].lstrip()
                return [piece]
        return []

    def _sentences(self) -> list[str]:
        out: list[str] = []
        end = _settled_end(self._buf)
        if end:
            out += split_sentences(self._buf[:end], self.max_chars)
            self._buf = self._buf[end:]
        while len(self._buf.strip()) > self.max_chars:
            cut = _clause_cut(self._buf, self.max_chars)
            if not cut:
                break
            out += split_sentences(self._buf[:cut], self.max_chars)
            self._buf = self._buf[cut:]
        return out

    def flush(self) -> list[str]:
        """The text still held, as sentences (the stream has ended)."""
        out = split_sentences(self._buf, self.max_chars)
        self._buf = ""
        return out


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ChatError(Exception):
    """The LLM endpoint failed; ``str(err)`` says how, for a user to read.

    Attributes:
        kind: ``"unreachable"`` (no connection), ``"status"`` (an HTTP error
            status), ``"timeout"`` (connect, first token or between tokens),
            ``"stream"`` (a malformed, failed or empty stream).
        status: the endpoint's HTTP status for ``"status"``, else ``None``.
    """

    def __init__(self, msg: str, kind: str, status: Optional[int] = None) -> None:
        super().__init__(msg)
        self.kind = kind
        self.status = status

    @property
    def http_status(self) -> int:
        """The status for an answer to our own client: 504 for a timeout, else 502."""
        return 504 if self.kind == "timeout" else 502


def _chat_error(exc: BaseException, url: str) -> ChatError:
    """Turn an ``openai`` exception into a :class:`ChatError`."""
    if isinstance(exc, openai.APITimeoutError):
        return ChatError(f"LLM endpoint {url} timed out (connect or read)", "timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return ChatError(f"LLM endpoint {url} unreachable: {cause}", "unreachable")
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) else None
        detail = str(detail or body or exc.message)[:300]
        return ChatError(f"LLM endpoint {url} answered HTTP {exc.status_code}: {detail}", "status", exc.status_code)
    return ChatError(f"LLM stream from {url} failed: {exc}"[:400], "stream")


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


def _base_url(url: str) -> str:
    """``url`` without a trailing slash; ``/v1`` added when it has no path at all."""
    url = url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint, shared by all sessions.

    Args:
        url: the API base, e.g. ``http://127.0.0.1:11434/v1`` (Ollama),
            ``http://127.0.0.1:8000/v1`` (vLLM, llama.cpp); ``/v1`` is added to a
            bare ``http://host:port``.
        model: the model name; ``None`` asks the endpoint (``GET /models``) once and
            takes the first (vLLM and llama.cpp serve one).
        system_prompt: sent first in every request (unless the history starts with
            its own system message); ``""`` sends none.
        api_key: the bearer key; default ``$LLM_API_KEY``, else a dummy key.
        connect_timeout: TCP/TLS connect limit (s).
        first_token_timeout: request start -> first content token limit (s).
        token_timeout: longest gap between content tokens (s).
        max_sentence_chars: sentences longer than this are cut at clause boundaries.
        first_piece_words: a reply's first piece ends at its first clause mark or
            after this many words (0: at its first sentence end, like the others).
        extra: more ``chat.completions.create`` arguments (``temperature``, ...).
    """

    def __init__(
        self,
        url: str,
        model: Optional[str] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        api_key: Optional[str] = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        first_token_timeout: float = FIRST_TOKEN_TIMEOUT_S,
        token_timeout: float = TOKEN_TIMEOUT_S,
        max_sentence_chars: int = MAX_SENTENCE_CHARS,
        first_piece_words: int = FIRST_PIECE_WORDS,
        extra: Optional[dict[str, Any]] = None,
    ) -> None:
        self.url = _base_url(url)
        self.model = model or None
        self.system_prompt = system_prompt
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        self.max_sentence_chars = max_sentence_chars
        self.first_piece_words = first_piece_words
        self.extra = dict(extra or {})
        self._model_lock = asyncio.Lock()
        self._api = openai.AsyncOpenAI(
            base_url=self.url,
            api_key=api_key or os.environ.get(API_KEY_ENV) or DUMMY_API_KEY,
            timeout=openai.Timeout(token_timeout, connect=connect_timeout),
            max_retries=0,  # a retry would double the wait; the user asks again
        )

    @classmethod
    def from_options(cls, args: argparse.Namespace) -> Optional["ChatClient"]:
        """The client for the ``--llm_*`` options (:func:`add_arguments`); ``None``
        when ``--llm_url`` is not set (then ``type: "chat"`` is a 400 naming it)."""
        if not getattr(args, "llm_url", None):
            return None
        return cls(
            args.llm_url,
            model=getattr(args, "llm_model", None),
            system_prompt=getattr(args, "llm_system_prompt", DEFAULT_SYSTEM_PROMPT),
            first_token_timeout=getattr(args, "llm_timeout", FIRST_TOKEN_TIMEOUT_S),
            first_piece_words=getattr(args, "llm_first_words", FIRST_PIECE_WORDS),
        )

    def messages(self, history: Sequence[Message], user_text: str) -> list[Message]:
        """The request's messages: the system prompt, ``history``, then ``user_text``."""
        msgs = [dict(m) for m in history]
        if self.system_prompt and not (msgs and msgs[0].get("role") == "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": user_text})
        return msgs

    def reply(self, history: Sequence[Message], user_text: str) -> "ChatReply":
        """Ask for the reply to ``user_text`` after ``history`` (without a system
        message, the client's system prompt goes first).

        Returns a :class:`ChatReply`: ``async for sentence in reply`` yields each
        sentence as soon as it is complete; iteration raises :class:`ChatError`
        when the endpoint fails. The request starts at the first iteration (or
        ``async with``). Use it as ``async with`` (or call :meth:`ChatReply.cancel`)
        so that leaving early closes the stream.
        """
        return ChatReply(self, self.messages(history, user_text))

    async def resolve_model(self) -> str:
        """The model name: the configured one, else the endpoint's first.

        Raises:
            ChatError: the endpoint failed or lists no model.
        """
        async with self._model_lock:
            if self.model is None:
                try:
                    models = [m.id async for m in self._api.models.list()]
                except openai.OpenAIError as e:
                    raise _chat_error(e, self.url) from e
                if not models:
                    raise ChatError(f"LLM endpoint {self.url} lists no model: set --llm_model", "stream")
                self.model = models[0]
                log.info("chat: using model %s of %s", self.model, self.url)
            return self.model

    async def aclose(self) -> None:
        """Close the connection pool (server shutdown)."""
        await self._api.close()


_END = object()


class ChatReply:
    """One streamed reply: an async iterator over its sentences.

    A task of its own reads the token stream (so tokens keep coming while the
    consumer is busy speaking) and queues completed sentences. Cancelling the
    task that iterates, :meth:`cancel`, :meth:`aclose` or leaving ``async with``
    stops that reader: the HTTP response is closed (the endpoint sees the
    connection close) and no further token is read; iteration then ends.

    Attributes:
        text: all content received so far.
        sentences: the sentences produced so far, in order.
        first_token_s: request start -> first content token (s), or ``None``.
        first_sentence_s: request start -> first sentence ready (s), or ``None``.
        cancelled: :meth:`cancel` was called (or the consumer was cancelled).
    """

    def __init__(self, client: ChatClient, messages: list[Message]) -> None:
        self._client = client
        self.messages = messages
        self.text = ""
        self.sentences: list[str] = []
        self.first_token_s: Optional[float] = None
        self.first_sentence_s: Optional[float] = None
        self.cancelled = False
        self._queue: asyncio.Queue = asyncio.Queue()  # unbounded: sentences are small text
        self._task: Optional[asyncio.Task] = None
        self._done = False

    def _start(self) -> None:
        if self._task is None and not self.cancelled:
            self._task = asyncio.get_running_loop().create_task(self._read(), name="chat-reply")

    def __aiter__(self) -> "ChatReply":
        return self

    async def __anext__(self) -> str:
        self._start()
        if self._done or self.cancelled:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self.cancelled or item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, ChatError):
            self._done = True
            raise item
        return item

    async def __aenter__(self) -> "ChatReply":
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def cancel(self) -> None:
        """Stop now: close the stream, read no more tokens, end the iteration.
        Safe to call more than once and from any coroutine of the loop."""
        self.cancelled = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._queue.put_nowait(_END)

    async def aclose(self) -> None:
        """:meth:`cancel` and wait until the HTTP response is closed."""
        self.cancel()
        if self._task is not None:
            await asyncio.wait({self._task})

    async def _read(self) -> None:
        """The reader task: stream tokens, queue sentences, then ``_END``."""
        client, loop = self._client, asyncio.get_running_loop()
        t0 = loop.time()
        splitter = SentenceSplitter(client.max_sentence_chars, client.first_piece_words)
        got_token = False

        def put(sentences: list[str]) -> None:
            for s in sentences:
                if self.first_sentence_s is None:
                    self.first_sentence_s = loop.time() - t0
                self.sentences.append(s)
                self._queue.put_nowait(s)

        try:
            async with asyncio.timeout(client.first_token_timeout) as deadline:
                model = await client.resolve_model()
                stream = await client._api.chat.completions.create(
                    model=model, messages=self.messages, stream=True, **client.extra
                )
                async with stream:  # closes the HTTP response however we leave
                    async for chunk in stream:
                        if not chunk.choices:
                            continue
                        delta = chunk.choices[0].delta.content if chunk.choices[0].delta else None
                        if not delta:
                            continue
                        if not got_token:
                            got_token = True
                            self.first_token_s = loop.time() - t0
                        deadline.reschedule(loop.time() + client.token_timeout)
                        self.text += delta
                        put(splitter.feed(delta))
            put(splitter.flush())
            if not self.sentences:
                raise ChatError(f"LLM endpoint {client.url} sent an empty reply", "stream")
        except TimeoutError:
            if got_token:
                msg = f"LLM endpoint {client.url} stopped sending for {client.token_timeout:g} s"
            else:
                msg = f"LLM endpoint {client.url} sent no token within {client.first_token_timeout:g} s"
            self._queue.put_nowait(ChatError(msg, "timeout"))
        except ChatError as e:
            self._queue.put_nowait(e)
        except openai.OpenAIError as e:
            self._queue.put_nowait(_chat_error(e, client.url))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an unexpected stream: still end the iteration
            log.exception("chat: reading the reply failed")
            self._queue.put_nowait(ChatError(f"LLM stream from {client.url} failed: {e!r}"[:400], "stream"))
        finally:
            self._queue.put_nowait(_END)


# ---------------------------------------------------------------------------
# Per-session history
# ---------------------------------------------------------------------------


def _join(parts: Sequence[str]) -> str:
    """Sentences joined with a space, none after a CJK end mark."""
    out = ""
    for p in parts:
        if out and out.rstrip(_CLOSERS)[-1:] not in tuple(_CJK_END):
            out += " "
        out += p
    return out


def _truncate(sentence: str, fraction: float) -> str:
    """The first ``fraction`` of ``sentence``: whole words (floor), or characters when
    it has no spaces (CJK)."""
    fraction = min(max(fraction, 0.0), 1.0)
    words = sentence.split()
    if len(words) > 1:
        return " ".join(words[: int(len(words) * fraction)])
    return sentence[: int(len(sentence) * fraction)]


@dataclass
class _Timing:
    offset_s: Optional[float]
    duration_s: Optional[float]


class AssistantTurn:
    """Bookkeeping of one spoken reply, driven by playback events.

    ``add`` each sentence as the reply yields it, report ``sentence_started`` as its
    ``text`` event comes, then ``finish()`` when the utterance played to its end, or
    ``finish_at(playback_position)`` when it was interrupted (or ``finish(n, f)``
    with explicit counts). Only then is the reply recorded in the conversation.
    """

    def __init__(self, conversation: "Conversation", user_text: str) -> None:
        self._conv = conversation
        self.user_text = user_text
        self.sentences: list[str] = []
        self._started: dict[int, _Timing] = {}
        self.recorded: Optional[str] = None  # what finish() recorded (None: not finished)

    @property
    def finished(self) -> bool:
        return self.recorded is not None

    def add(self, sentence: str) -> int:
        """Register the next sentence of the reply; returns its index (from 0)."""
        self.sentences.append(sentence)
        return len(self.sentences) - 1

    def sentence_started(self, i: int, offset_s: Optional[float] = None, duration_s: Optional[float] = None) -> None:
        """Sentence ``i`` started playing, ``offset_s`` seconds into the utterance's
        audio, lasting ``duration_s`` seconds (either may be unknown)."""
        if not 0 <= i < len(self.sentences):
            raise IndexError(f"sentence {i} was not added ({len(self.sentences)} are)")
        self._started[i] = _Timing(offset_s, duration_s)

    @property
    def started(self) -> int:
        """How many sentences have started playing (the first ``n``)."""
        return max(self._started) + 1 if self._started else 0

    def finish(self, played_sentences: Optional[int] = None, cut_fraction: float = 0.0) -> str:
        """Record the reply as played: the first ``played_sentences`` sentences in full
        (default: all that started), then the next one cut to ``cut_fraction`` of its
        words. A reply with unplayed sentences gets :data:`CUT_MARK`. A reply of which
        nothing played records nothing: the user's text stays pending and is merged
        into the next :meth:`Conversation.record_user`.

        Returns the recorded assistant text ("" when nothing). A second call does
        nothing and returns the same.
        """
        if self.recorded is not None:
            return self.recorded
        n = len(self.sentences)
        played = self.started if played_sentences is None else max(0, min(played_sentences, n))
        parts = self.sentences[:played]
        if played < n:
            cut = _truncate(self.sentences[played], cut_fraction)
            if cut:
                parts.append(cut)
        text = _join(parts)
        if text and played < n:
            text += CUT_MARK
        self.recorded = text
        self._conv._commit(self, text)
        return text

    def finish_at(self, playback_position_s: float) -> str:
        """Record the reply as cut off ``playback_position_s`` seconds into its audio
        (``playback_finished``'s ``playback_position``). Sentence timings come from
        :meth:`sentence_started`; a missing offset is the previous sentence's end, a
        missing duration the next offset minus this one, else
        ``len(text) / SPEECH_CHARS_PER_S``. Returns what :meth:`finish` recorded."""
        t = 0.0
        for i in range(self.started):
            timing = self._started.get(i, _Timing(None, None))
            offset = t if timing.offset_s is None else timing.offset_s
            duration = timing.duration_s
            nxt = self._started.get(i + 1)
            if duration is None and nxt is not None and nxt.offset_s is not None:
                duration = nxt.offset_s - offset
            if duration is None or duration <= 0:
                duration = max(len(self.sentences[i]) / SPEECH_CHARS_PER_S, 1e-3)
            if playback_position_s < offset + duration:
                return self.finish(i, (playback_position_s - offset) / duration)
            t = offset + duration
        return self.finish(self.started, 0.0)


class Conversation:
    """A session's chat history: bounded, alternating user/assistant turns.

    A turn is kept only once its reply has played (at least in part), with the
    played part only (:class:`AssistantTurn`). The oldest turns go first beyond
    ``max_turns`` pairs or ``max_chars`` characters of content. Use it from the
    session's event loop (not thread-safe).

    Args:
        max_turns: user/assistant pairs kept.
        max_chars: characters of history content kept (the system prompt not counted).
        system_prompt: a per-session system prompt put first in :attr:`history`
            (overrides the client's); ``None`` leaves the client's.
    """

    def __init__(
        self, max_turns: int = HISTORY_TURNS, max_chars: int = HISTORY_CHARS, system_prompt: Optional[str] = None
    ) -> None:
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.system_prompt = system_prompt
        self._turns: list[tuple[str, str]] = []  # (user, assistant as played)
        self._pending: Optional[str] = None  # user text not yet answered by anything played
        self._open: Optional[AssistantTurn] = None

    @property
    def history(self) -> list[Message]:
        """The messages to send before the next user text: the system prompt (if
        set here), then the kept turns, oldest first."""
        msgs: list[Message] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        for user, assistant in self._turns:
            msgs.append({"role": "user", "content": user})
            msgs.append({"role": "assistant", "content": assistant})
        return msgs

    @property
    def pending(self) -> Optional[str]:
        """User text waiting for a reply that plays (``None``: none)."""
        return self._pending

    def record_user(self, text: str) -> str:
        """The user said ``text``. Returns the user message to send: ``text``, after
        any earlier user text that no played reply answered (joined by a line
        break). A turn still open is finished first with the sentences that started
        (call its ``finish``/``finish_at`` before this for exact bookkeeping).

        Raises:
            ValueError: blank ``text``.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty user text")
        if self._open is not None:
            self._open.finish()
        self._pending = f"{self._pending}\n{text}" if self._pending else text
        return self._pending

    def assistant_turn(self) -> AssistantTurn:
        """Start the bookkeeping of the reply to the pending user text.

        Raises:
            ValueError: no user text is pending (call :meth:`record_user` first).
        """
        if self._pending is None:
            raise ValueError("no user text to answer: call record_user first")
        if self._open is not None:
            self._open.finish()
        turn = AssistantTurn(self, self._pending)
        self._pending = None
        self._open = turn
        return turn

    def clear(self) -> None:
        """Forget everything (a new conversation)."""
        if self._open is not None:
            self._open.recorded = ""
        self._turns.clear()
        self._pending = None
        self._open = None

    def _commit(self, turn: AssistantTurn, assistant_text: str) -> None:
        if self._open is turn:
            self._open = None
        if not assistant_text:  # nothing played: the question is still open
            self._pending = f"{turn.user_text}\n{self._pending}" if self._pending else turn.user_text
            return
        self._turns.append((turn.user_text, assistant_text))
        del self._turns[: max(0, len(self._turns) - self.max_turns)]
        while self._turns and sum(len(u) + len(a) for u, a in self._turns) > self.max_chars:
            del self._turns[0]


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--llm_*`` options (read by :meth:`ChatClient.from_options`)."""
    g = parser.add_argument_group("chat (an OpenAI-compatible LLM)")
    g.add_argument("--llm_url", help="chat-completions API base, e.g. http://127.0.0.1:11434/v1 (key: $LLM_API_KEY)")
    g.add_argument("--llm_model", help="model name (default: the endpoint's first listed model)")
    g.add_argument("--llm_system_prompt", default=DEFAULT_SYSTEM_PROMPT, help="system prompt sent first")
    g.add_argument("--llm_timeout", type=float, default=FIRST_TOKEN_TIMEOUT_S, help="first-token limit (s)")
    g.add_argument("--llm_first_words", type=int, default=FIRST_PIECE_WORDS,
                   help="speak a reply's first piece after this many words or its first clause mark, "
                        "before its sentence ends (0: wait for the sentence end)")
