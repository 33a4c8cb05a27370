"""mlx-lm's OpenAI-compatible server (`mlx_lm.server`) serving rg_mlx's model, with a thin layer of ours.

mlx-lm gives the server, unchanged and in this process: the endpoints (`/v1/chat/completions`,
`/v1/completions`, `/v1/models`, `/health`), request parsing and validation, the chat template,
streaming (server-sent events), continuous batching (`BatchGenerator`), the prompt-state cache
(`LRUPromptCache`, with its byte budget), seeds, stop strings, logprobs, usage with cached tokens and
tool-call parsing. With `rg_mlx.integration.register_with_mlx_lm` it builds rg_mlx's exact model.

What a client needs that it lacks is added here by subclassing its handler, model provider and
response generator (never by copying their code):

- the model field: requests name the served model (its name, or mlx-lm's ``default_model``); any
  other name is refused (404) instead of being loaded as a path or hub repo, the per-request
  ``adapters`` and ``draft_model`` fields are refused (400), and responses and `/v1/models` give the
  served name;
- an API key: with one set, every endpoint but `/health` answers 401 without ``Authorization: Bearer KEY``;
- disconnects: a request whose client has gone, streaming or not, stops generating within a token or
  two (mlx-lm notices only failed writes, so never for a non-streaming request, and its batch loop
  removes a stopped request only after up to half a second of steps);
- a prompt-length limit: a longer prompt gets a 400 naming both lengths;
- chat prompts encoded turn by turn, each turn's tokens remembered (`TurnTokenizer`): every request
  carries the whole conversation, and encoding it anew made a new turn's wait grow with its length;
- counters at `GET /stats` (tokens generated, requests, disconnects), which the tests read;
- startup: the model loads before the server answers, and a load that fails is one error.

Under `mlx.launch`, rank 0 serves HTTP and the other ranks follow it (mlx-lm's `ResponseGenerator`
shares every request with them); the model is sharded by mlx-lm's `sharded_load`, which needs
`Model.shard(group)` (see `ModelProvider._load`).
"""

from __future__ import annotations

import argparse
import hmac
import json
import select
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from http.server import ThreadingHTTPServer
from queue import Queue
from typing import Any
from urllib.parse import unquote, urlsplit

import mlx.core as mx
import mlx_lm.server as mlx_server

from .errors import RGError, first_line

__all__ = ["Counters", "ServeOptions", "ServerOptionError", "server_arguments", "serve"]

# The name mlx-lm's server gives the model it was started with.
DEFAULT_MODEL = "default_model"


class ServerOptionError(ValueError):
    """A value of an mlx-lm server option that mlx-lm's parser could not read (the message says why)."""


def server_arguments(argv: Sequence[str], prog: str = "rg-mlx serve") -> argparse.Namespace:
    """mlx-lm's server options, read by mlx-lm's own parser: `mlx_lm.server.main`, stopped before it serves.

    A bad option exits with status 2 as argparse does (usage, then one line naming it); a value its
    parser's converters reject raises `ServerOptionError`.
    """
    parsed: list[argparse.Namespace] = []

    def keep(host: str, port: int, provider: Any, *args: Any, **kwargs: Any) -> None:
        parsed.append(provider.cli_args)

    saved = mlx_server.run, sys.argv
    mlx_server.run, sys.argv = keep, [prog, *argv]
    try:
        mlx_server.main()
    except (ArithmeticError, LookupError) as e:  # e.g. --prompt-cache-bytes 2X (mlx-lm's size parser)
        raise ServerOptionError(first_line(e)) from None
    finally:
        mlx_server.run, sys.argv = saved
    return parsed[0]


@dataclass(frozen=True)
class ServeOptions:
    """What our layer adds to mlx-lm's server.

    Args:
        name: the served model's name (`/v1/models`, the ``model`` field of responses).
        aliases: other names requests may give it (its folder, mlx-lm's ``default_model``).
        api_key: when set, required as ``Authorization: Bearer KEY`` on every endpoint but `/health`.
        max_prompt_tokens: longest prompt accepted (None: any).
    """

    name: str
    aliases: frozenset[str] = frozenset()
    api_key: str | None = None
    max_prompt_tokens: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def serves(self, name: str) -> bool:
        return name == self.name or name == DEFAULT_MODEL or name in self.aliases


class Counters:
    """What the server has done, for `GET /stats`: completion requests started, tokens generated
    (counted as the generation thread hands them out, so tokens made for a client that has gone count
    too), and requests whose client went away before the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "generated_tokens": 0, "disconnects": 0}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class ClientError(ValueError):
    """A request we refuse, with its HTTP status and OpenAI's error code; raised inside mlx-lm's request
    flow, which answers it (as 400 or 404) with the message, and `Handler` corrects the status. A
    `ValueError`, as mlx-lm's own parameter checks raise."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class ClientGone(Exception):
    """The client closed its connection while its request was being answered."""


class _Counting:
    """One request's response queue, as the generation thread sees it: counts the tokens put in it."""

    def __init__(self, queue: Any, counters: Counters):
        self._queue, self._counters = queue, counters

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(item, mlx_server.Response):
            self._counters.add("generated_tokens")
        self._queue.put(item, *args, **kwargs)


class _Requests(Queue):
    """mlx-lm's request queue, each request's response queue wrapped in `_Counting`."""

    def __init__(self, counters: Counters):
        super().__init__()
        self._counters = counters

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        responses, *rest = item
        super().put((_Counting(responses, self._counters), *rest), *args, **kwargs)


class _OneStep:
    """The time budget of mlx-lm's batch loop, one step long.

    mlx-lm runs batch steps for up to half a second before it looks at new requests and removes the
    stopped ones, so a request whose client has gone would go on for tens of tokens. One step per
    look costs a queue poll per step (next to a model step of milliseconds) and lets new requests
    join at the next step. Every rank of a distributed server takes the same single step.
    """

    def __iter__(self) -> _OneStep:
        self._stepped = False
        return self

    def __next__(self) -> None:
        if self._stepped:
            raise StopIteration
        self._stepped = True


class ModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider, whose first load (the served model, on the generation thread as
    mlx-lm does it) reports its outcome to `wait_loaded` instead of ending the thread with a traceback."""

    def __init__(self, cli_args: argparse.Namespace):
        super().__init__(cli_args)
        self._loaded = threading.Event()
        self._error: BaseException | None = None

    def _load(self, model_path: str, adapter_path: str | None = None, draft_model_path: str | None = None) -> None:
        if self._loaded.is_set():  # not reached: every request is mapped to the served model
            return super()._load(model_path, adapter_path, draft_model_path)
        try:
            super()._load(model_path, adapter_path, draft_model_path)
        except Exception as e:  # reported in the main thread by `wait_loaded`, as one line
            self._error = e
        finally:
            self._loaded.set()

    def wait_loaded(self) -> None:
        """Wait for the served model to load; `RGError` if it failed."""
        self._loaded.wait()
        if self._error is not None:
            if isinstance(self._error, RGError):
                raise self._error
            raise RGError(f"cannot load {self.cli_args.model}: {first_line(self._error)}")


class TurnTokenizer:
    """mlx-lm's tokenizer, whose chat prompts (`apply_chat_template(..., tokenize=True)`) are encoded turn by
    turn, each turn's tokens remembered.

    A chat request carries the whole conversation, so without this a new turn after 35k tokens of history
    waits for all of them to be encoded again (~40 ms with the demo's tokenizer). The rendered text is cut
    just before each `marker` (Gemma's `<start_of_turn>`), a special token at which the tokenizer splits the
    text anyway, so the pieces' tokens joined are those of the whole text. That is checked once, on a
    conversation of awkward text; a tokenizer for which it fails (or that lacks the marker) encodes whole.
    Everything else is the wrapped tokenizer's.
    """

    MAX_CHARS = 1 << 24  # text of the turns remembered, at most (least recently used go first)
    _SAMPLE = [
        {"role": "user", "content": " two  spaces\n\n and a tab\t, «unicode» ✓ <end_of_turn> in the text "},
        {"role": "assistant", "content": "\n leading newline and trailing space "},
        {"role": "user", "content": "<start_of_turn>model\n typed by the user"},
    ]

    def __init__(self, tokenizer: Any, marker: str = "<start_of_turn>"):
        self._tokenizer, self._marker = tokenizer, marker
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self._exact: bool | None = None  # checked on first use

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages: Any, *args: Any, tokenize: bool = True, **kwargs: Any) -> Any:
        whole = self._tokenizer.apply_chat_template
        if not tokenize or kwargs.get("return_dict") or not self._turns_exact(whole, args, kwargs):
            return whole(messages, *args, tokenize=tokenize, **kwargs)
        return self._encode(whole(messages, *args, tokenize=False, **kwargs))

    def _turns_exact(self, whole: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
        if self._exact is None:
            try:
                expected = whole(self._SAMPLE, *args, tokenize=True, **kwargs)
                self._exact = (isinstance(expected, list) and self._marker in self._tokenizer.get_vocab()
                               and self._encode(whole(self._SAMPLE, *args, tokenize=False, **kwargs)) == expected)
            except Exception:  # a template or tokenizer this was not made for: encode whole
                self._exact = False
        return self._exact

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        while start < len(text):
            cut = text.find(self._marker, start + 1)
            end = len(text) if cut < 0 else cut
            ids += self._piece(text[start:end])
            start = end
        return ids

    def _piece(self, piece: str) -> list[int]:
        with self._lock:
            ids = self._memo.get(piece)
            if ids is not None:
                self._memo.move_to_end(piece)
                return ids
        ids = self._tokenizer.encode(piece, add_special_tokens=False)
        with self._lock:
            if piece not in self._memo:
                self._memo[piece] = ids
                self._chars += len(piece)
                while self._chars > self.MAX_CHARS and self._memo:
                    self._chars -= len(self._memo.popitem(last=False)[0])
        return ids


class ResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's response generator (its generation thread, batching and prompt cache), counting the
    tokens it generates, taking one batch step between looks at its requests (`_OneStep`), encoding
    chat prompts turn by turn (`TurnTokenizer`), and refusing prompts longer than `max_prompt_tokens`."""

    def __init__(
        self,
        model_provider: ModelProvider,
        prompt_cache: Any,
        *,
        counters: Counters,
        max_prompt_tokens: int | None = None,
    ):
        self.counters = counters
        self.max_prompt_tokens = max_prompt_tokens
        self._turns: TurnTokenizer | None = None
        super().__init__(model_provider, prompt_cache)
        # The generation thread has started, but it reads these attributes on every pass of its loop,
        # and no request can have arrived yet: the HTTP server starts after this.
        self.requests = _Requests(counters)
        self._time_budget = _OneStep()

    def _tokenize(self, tokenizer: Any, request: Any, args: Any) -> Any:
        if self._turns is None or self._turns._tokenizer is not tokenizer:
            self._turns = TurnTokenizer(tokenizer)
        tokenized = super()._tokenize(self._turns, request, args)
        n, limit = len(tokenized[0]), self.max_prompt_tokens
        if limit is not None and n > limit:
            message = f"the prompt has {n} tokens; the server takes at most {limit} (--max-prompt-tokens)"
            raise ClientError(400, message, "context_length_exceeded")
        return tokenized


class _Watched:
    """The response generator as one request's handler sees it: its tokens (and its prompt-progress
    reports) stop with `ClientGone` once the client has closed the connection."""

    def __init__(self, generator: ResponseGenerator, handler: Handler):
        self._generator, self._handler = generator, handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)

    def generate(self, request: Any, args: Any, progress_callback: Callable[[int, int], None] | None = None) -> Any:
        def progress(done: int, total: int) -> None:
            self._handler.check_connected()
            if progress_callback is not None:
                progress_callback(done, total)

        try:
            ctx, responses = self._generator.generate(request, args, progress)
        except ClientError as e:
            self._handler.refuse(e)
            raise
        self._generator.counters.add("requests")
        return ctx, self._watch(responses)

    def _watch(self, responses: Iterator[Any]) -> Iterator[Any]:
        for response in responses:
            self._handler.check_connected()
            yield response


class _ErrorBodies:
    """A handler's output stream, through which mlx-lm's error bodies (``{"error": "message"}``) go out
    in OpenAI's shape (``{"error": {"message": ..., "type": ..., "code": ...}}``): OpenAI's clients
    read the message from there, and show only the status otherwise."""

    def __init__(self, stream: Any, handler: Handler):
        self._stream, self._handler = stream, handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, data: bytes) -> int:
        if self._handler.sent_status >= 400 and data.startswith(b"{"):
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                handler = self._handler
                data = json.dumps(_error(body["error"], handler.error_code, handler.sent_status)).encode()
        return self._stream.write(data)


class Handler(mlx_server.APIHandler):
    """mlx-lm's request handler with our layer: the API key, the served model's name, disconnects,
    `/stats`, `/v1/models`, log-probabilities and error bodies in OpenAI's shape. Reads
    `server.options` (`ServeOptions`)."""

    server: _Server

    def __init__(self, response_generator: ResponseGenerator, *args: Any, **kwargs: Any):
        self.sent_status = 0  # of the response being sent
        self.error_code: str | None = None
        self._refused: ClientError | None = None  # a refusal of ours that mlx-lm answers
        super().__init__(_Watched(response_generator, self), *args, **kwargs)

    def setup(self) -> None:
        super().setup()
        self.wfile = _ErrorBodies(self.wfile, self)

    # -- our checks, before mlx-lm's handling -------------------------------------------------------
    def do_POST(self) -> None:
        if not self._authorized():
            return
        try:
            super().do_POST()
        except (ClientGone, ConnectionError):  # ConnectionError: a write to a closed stream
            self.response_generator.counters.add("disconnects")
            self.close_connection = True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            super().do_GET()
        elif self._authorized():
            if path == "/stats":
                self._send_json(200, self.response_generator.counters.snapshot())
            else:
                super().do_GET()

    def _authorized(self) -> bool:
        key = self.server.options.api_key
        if key is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return True
        # The request body (if any) is left unread: close the connection rather than read it as a request.
        self.close_connection = True
        self._send_json(
            401,
            _error("missing or wrong API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key", 401),
            {"WWW-Authenticate": "Bearer", "Connection": "close"},
        )
        return False

    def validate_model_parameters(self) -> None:
        if self.path == "/v1/completions" and type(self.logprobs) is int:
            # The legacy completions API gives `logprobs` as the number of alternatives to report.
            if self.top_logprobs == -1 and self.logprobs > 0:
                self.top_logprobs = self.logprobs
            self.logprobs = True
        super().validate_model_parameters()
        options = self.server.options
        if not options.serves(self.requested_model):
            message = f"model {self.requested_model!r} is not served here; it serves {options.name!r}"
            raise self.refuse(ClientError(404, message, "model_not_found"))
        if self.adapter is not None:
            message = "'adapters' is not accepted: the server serves one model (see --adapter-path)"
            raise self.refuse(ClientError(400, message, "unsupported_parameter"))
        if self.requested_draft_model != DEFAULT_MODEL:
            message = "'draft_model' is not accepted: speculative decoding rewinds the state, ours cannot"
            raise self.refuse(ClientError(400, message, "unsupported_parameter"))
        tokenizer = self.response_generator.model_provider.tokenizer
        if self.path.endswith("/chat/completions") and not tokenizer.has_chat_template:
            # mlx-lm would fall back to a "USER: ... ASSISTANT:" prompt, which no Gemma model was trained on.
            message = (f"{options.name!r} has no chat template (not an instruction-tuned model): use /v1/completions, "
                       "or give one with --chat-template")
            raise self.refuse(ClientError(400, message, "unsupported_endpoint"))
        self.requested_model = DEFAULT_MODEL  # what mlx-lm's provider knows the served model as

    def check_connected(self) -> None:
        """Raise `ClientGone` if the client has closed the connection (its end of the socket reads as
        closed; a client that sent more, such as a pipelined request, is still there)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            gone = bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            gone = True
        if gone:
            raise ClientGone

    def refuse(self, error: ClientError) -> ClientError:
        """Make mlx-lm's error answer to the request being handled carry `error`'s status and code."""
        self._refused = error
        return error

    def send_response(self, code: int, message: str | None = None) -> None:
        if self._refused is not None and code >= 400:
            code, self.error_code, self._refused = self._refused.status, self._refused.code, None
        self.sent_status = code
        super().send_response(code, message)

    # -- responses: the served model's name, log-probabilities in OpenAI's shape --------------------
    def generate_response(self, *args: Any, **kwargs: Any) -> dict:
        response = super().generate_response(*args, **kwargs)
        tokens, logprobs = kwargs.get("tokens") or [], kwargs.get("token_logprobs") or []
        if tokens and len(logprobs) == len(tokens):
            response["choices"][0]["logprobs"] = self._logprobs(tokens, logprobs, kwargs.get("top_tokens"))
        return self._named(response)

    def _logprobs(self, tokens: list[int], logprobs: list[float], top: list[tuple[dict, ...]] | None) -> dict:
        """The log-probabilities of a reply as OpenAI's API gives them: an entry per generated token
        (its piece, log-probability and most likely alternatives, most likely first), where mlx-lm gives
        no piece unless alternatives are asked for, and then, in place of the sampled token's entry, the
        first of the alternatives, which it leaves unordered. A completion also gets the legacy fields of
        `/v1/completions`. Each entry keeps mlx-lm's token `id`."""
        pieces = self.response_generator.model_provider.tokenizer.convert_ids_to_tokens

        def entry(ids: list[int], values: list[float]) -> list[dict]:
            return [{"id": i, "token": p, "bytes": None, "logprob": v} for i, p, v in zip(ids, pieces(ids), values)]

        alternatives = [
            entry([t["id"] for t in k], [t["logprob"] for t in k])
            for k in (sorted(k, key=lambda t: -t["logprob"]) for k in (top or [()] * len(tokens)))
        ]
        content = [dict(e, top_logprobs=a) for e, a in zip(entry(tokens, logprobs), alternatives)]
        if self.object_type != "text_completion":
            return {"content": content}
        return {
            "content": content,
            "tokens": [e["token"] for e in content],
            "token_logprobs": list(logprobs),
            "top_logprobs": [{t["token"]: t["logprob"] for t in a} for a in alternatives] if top else None,
        }

    def completion_usage_response(self, *args: Any, **kwargs: Any) -> dict:
        return self._named(super().completion_usage_response(*args, **kwargs))

    def _named(self, response: dict) -> dict:
        response["model"] = self.server.options.name
        return response

    def handle_models_request(self) -> None:
        options = self.server.options
        model = {"id": options.name, "object": "model", "created": options.created, "owned_by": "rg-mlx"}
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path.startswith("/v1/models/") and options.serves(unquote(path[len("/v1/models/"):])):
            self._send_json(200, model)
        else:
            self._send_json(404, _error(f"no such model; this server serves {options.name!r}", "model_not_found", 404))

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._set_completion_headers(status)
        for name, value in {**(headers or {}), "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def _error(message: str, code: str | None, status: int) -> dict:
    """An error body as OpenAI's API writes one."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Server(ThreadingHTTPServer):
    """The HTTP server: mlx-lm's handler class on Python's threading server, our options beside it."""

    options: ServeOptions


def _bind(host: str, port: int, options: ServeOptions) -> _Server:
    """The HTTP server, bound and listening (IPv4 or IPv6, as `host` resolves); its handler is set later."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = type("Server", (_Server,), {"address_family": family})
        server = server_class(address, Handler)
    except OSError as e:
        raise RGError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --host or --port)") from None
    server.options = options
    return server


def serve(
    cli_args: argparse.Namespace,
    options: ServeOptions,
    *,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the model of `cli_args` (mlx-lm's server options, `server_arguments`) until interrupted.

    Register rg_mlx's model with mlx-lm first (`rg_mlx.integration.register_with_mlx_lm`). The socket
    is bound, then the model loaded, then `ready(url)` is called and requests are answered.
    Raises `RGError` when the address cannot be bound or the model cannot be loaded.
    """
    group = mx.distributed.init()
    serves_http = group.rank() == 0  # under mlx.launch the other ranks follow rank 0's requests
    # Bound before the model loads: a busy port fails at once.
    server = _bind(cli_args.host, cli_args.port, options) if serves_http else None
    provider = ModelProvider(cli_args)
    generator = ResponseGenerator(
        provider, mlx_server.LRUPromptCache(cli_args.prompt_cache_size), counters=Counters(),
        max_prompt_tokens=options.max_prompt_tokens,
    )
    try:
        if server is not None:
            server.RequestHandlerClass = partial(Handler, generator)
        provider.wait_loaded()
        if server is None:
            generator.join()
            return
        host, port = server.server_address[:2]
        if ready is not None:
            ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
        server.serve_forever()
    finally:
        if server is not None:
            server.server_close()
        generator.stop_and_join()
