"""The HTTP server on a loopback port: the official openai client (streaming and not, completions and chat),
raw HTTP for every bad input, keys and rate limits, 32 concurrent streams, disconnects, engine failures,
/health while loading or stuck, and SIGTERM draining a real `meshlm serve` process."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.tokenizer import load_tokenizer, train_bpe
from infer.decode import Decoder
from infer.generate import generate, model_tokenizer
from infer.sampling import SamplingParams
from infer.server import ServerOptions, build_serving, create_app
from model.load import load_model

KEY = "sk-test-key"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_file(stdlib_texts, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bpe") / "serve.tiktoken")
    train_bpe(stdlib_texts[:30], 400, path, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return path


@pytest.fixture(scope="module")
def loaded(tokenizer_file):
    return load_model(preset="tiny", tokenizer=tokenizer_file, vocab_size=load_tokenizer(tokenizer_file).vocab_size)


class Running:
    """A server on a free loopback port, in a thread of this process."""

    def __init__(self, loaded, options: ServerOptions | None = None, load=None, wait: bool = True, **serving):
        serving.setdefault("chat_template", CHATML)

        def build(metrics):
            return build_serving(loaded, metrics, model_name="tiny", **serving)

        self.app = create_app(load or build, options or ServerOptions(api_keys=frozenset({KEY})))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        self.http = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        if wait:
            self.wait_ready()

    @property
    def state(self):
        return self.app.state.server

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, self.http.get("/health").text
            time.sleep(0.05)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def metric(self, name: str) -> float:
        """A sample's value from /metrics (0 for a labelled counter not yet counted)."""
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        assert "{" in name, name
        return 0.0

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(loaded):
    running = Running(loaded)
    yield running
    running.close()


@pytest.fixture
def engine(server):
    """The module server's engine (compiled once) for the other servers of this module; they run one at a time."""
    return server.state.serving.scheduler.engine


def test_openai_client_streams_and_not_equal_the_decode_loop(server, loaded):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    prompt = "def read_file(path):\n"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0.8, seed=7)
    pieces = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0.8, seed=7,
                                       stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in pieces)
    assert streamed == whole.choices[0].text
    # the independent reference: the on-device decode loop with the same sampling
    tokenizer = model_tokenizer(loaded)
    decoder = Decoder(loaded.config, loaded.graphdef, loaded.params)
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=7, stop_token_ids=(tokenizer.eos_id,))
    [reference] = generate(decoder, [tokenizer.encode(prompt, special=True)], tokenizer, params)
    assert whole.choices[0].text == reference.text
    assert whole.usage.completion_tokens == len(reference.token_ids) == 24
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, seed=1)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    rendered = tokenizer.encode("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nSort a list."
                                "<|im_end|>\n<|im_start|>assistant\n", special=True)
    stops = (tokenizer.eos_id, tokenizer.token_id("<|im_end|>"))
    [reference] = generate(decoder, [rendered], tokenizer, SamplingParams(max_new_tokens=16, temperature=0,
                                                                           stop_token_ids=stops))
    assert chat.choices[0].message.content == reference.text and chat.usage.prompt_tokens == len(rendered)


def _error(response, status: int, param=None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def test_every_bad_input_gets_a_clear_error(server):
    http = server.http
    ok = {"model": "tiny", "prompt": "x = 1", "max_tokens": 4}
    anonymous = httpx.post(server.url + "/v1/completions", json=ok)
    assert "missing API key" in _error(anonymous, 401)
    wrong = httpx.post(server.url + "/v1/completions", json=ok, headers={"Authorization": "Bearer nope"})
    assert "invalid API key" in _error(wrong, 401)
    assert _error(http.post("/v1/completions", content=b"x" * (2 << 20)), 413)
    assert "not valid JSON" in _error(http.post("/v1/completions", content=b"{nope"), 400)
    assert "JSON object" in _error(http.post("/v1/completions", json=[1, 2]), 400)
    cases = [  # (changes to a good body, status, param, words in the message)
        ({"temprature": 0.5}, 400, "temprature", "unknown"),
        ({"temperature": "hot"}, 400, "temperature", "number"),
        ({"temperature": 2.5}, 400, "temperature", "2"),
        ({"top_p": 0}, 400, "top_p", "greater than 0"),
        ({"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 500}, 400, "max_tokens", "context of 128"),
        ({"prompt": "word " * 400}, 400, "prompt", "context of 128"),
        ({"prompt": ""}, 400, "prompt", "empty"),
        ({"prompt": [1, 2, 100000]}, 400, "prompt", "token id 100000"),
        ({"prompt": ["a", "b"]}, 400, "prompt", "several prompts"),
        ({"n": 2}, 400, "n", "n=1"),
        ({"presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
        ({"stop": [""]}, 400, "stop", "non-empty"),
        ({"stop": ["a"] * 9}, 400, "stop", "at most 8"),
        ({"stream": "yes"}, 400, "stream", "boolean"),
        ({"model": "gpt-4"}, 404, "model", "not served"),
    ]
    for change, status, param, words in cases:
        message = _error(http.post("/v1/completions", json={**ok, **change}), status, param)
        assert words in message, (change, message)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert "at least 1" in _error(http.post("/v1/chat/completions", json={**body, "messages": []}), 400, "messages")
    bad_role = {**body, "messages": [{"role": "robot", "content": "hi"}]}
    assert "messages[0].role" in _error(http.post("/v1/chat/completions", json=bad_role), 400, "messages")
    assert "max_tokens" in _error(http.post("/v1/chat/completions", json={**body, "max_tokens": 1000}), 400,
                                  "max_tokens")
    assert server.http.get("/health").json()["status"] == "ok"  # none of it hurt the server


JSON = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
                    | st.integers(min_value=-(2**80), max_value=2**80)
                    | st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**63 - 1, 2**64, 10**12, -(2**63), 0.5, 1e308]),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                     "stream", "stream_options", "n", "user", "ignore_eos", "presence_penalty", "frequency_penalty"]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f != "prompt"] + ["messages", "max_completion_tokens"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_json_in_any_request_field_gets_an_answer_or_a_4xx_never_a_500(server, data):
    """Hostile clients: every field of either endpoint set to arbitrary JSON values (huge and negative
    integers, wrong types, nesting), or left out. Each request gets a 200 with an answer or a 4xx with an
    OpenAI error body; the server never fails with a 500."""
    chat = data.draw(st.booleans(), "chat")
    body = ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} if chat
            else {"model": "tiny", "prompt": "x = 1", "max_tokens": 4})
    fields = data.draw(st.lists(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), min_size=1,
                                max_size=3, unique=True), "fields")
    for field in fields:
        if data.draw(st.booleans(), f"drop {field}"):
            body.pop(field, None)
        else:
            body[field] = data.draw(JSON, field)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    response = server.http.post(path, json=body)
    assert response.status_code == 200 or 400 <= response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]"), response.text
    else:
        assert response.json()["choices"], response.text


def test_ids_the_tokenizer_cannot_decode_are_masked_in_the_engine():
    """cl100k_base's id range has holes; a model of its vocabulary (random weights) must never draw them."""
    from infer.metrics import ServingMetrics

    tokenizer = load_tokenizer("cl100k_base")
    holed = load_model(preset="tiny", tokenizer="cl100k_base", vocab_size=tokenizer.vocab_size)
    serving = build_serving(holed, ServingMetrics(), model_name="tiny", slots=1, max_length=32, warm_up=False)
    allowed = np.asarray(serving.scheduler.engine.allowed)
    holes = [i for i in range(tokenizer.vocab_size) if not allowed[i]]
    assert 0 < len(holes) < 100
    for i in holes:
        with pytest.raises(KeyError):
            tokenizer._enc().decode_single_token_bytes(i)


def test_rate_limits_per_key(loaded, engine):
    running = Running(loaded, ServerOptions(api_keys=frozenset({KEY, "sk-other"}), requests_per_minute=3,
                                            tokens_per_minute=60), engine=engine)
    try:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4}
        for _ in range(3):
            assert running.http.post("/v1/completions", json=body).status_code == 200
        refused = running.http.post("/v1/completions", json=body)
        assert "3 requests per minute" in _error(refused, 429) and int(refused.headers["Retry-After"]) >= 1
        other = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer sk-other"})
        assert other.post("/v1/completions", json={**body, "max_tokens": 50}).status_code == 200  # 53 of 60 tokens
        tokens = other.post("/v1/completions", json={**body, "max_tokens": 10})
        assert "60 tokens per minute" in _error(tokens, 429) and "Retry-After" in tokens.headers
        assert "more than the key's limit" in _error(other.post("/v1/completions", json={**body, "max_tokens": 70}),
                                                     429)
        with pytest.raises(openai.RateLimitError):
            running.client().completions.create(model="tiny", prompt=[1], max_tokens=1)
    finally:
        running.close()


def test_a_full_queue_answers_503_with_retry_after(loaded, engine):
    running = Running(loaded, max_queue=0, engine=engine)
    try:
        refused = running.http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert "queue is full" in _error(refused, 503) and refused.headers["Retry-After"] == "1"
        assert running.metric('meshlm_requests_rejected_total{reason="queue_full"}') == 1
    finally:
        running.close()


def test_32_concurrent_streams_complete_and_equal_their_whole_texts(server):
    client = server.client()
    prompts = [("import os\n" * (1 + i % 6)) + f"def f{i}(x):" for i in range(32)]
    results, errors = {}, []

    def run(i):
        try:
            args = dict(model="tiny", prompt=prompts[i], max_tokens=4 + (i * 7) % 40, temperature=0.9, seed=i)
            stream = client.completions.create(stream=True, **args)
            results[i] = ("".join(c.choices[0].text for c in stream), client.completions.create(**args))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append((i, error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 32
    for i, (streamed, whole) in results.items():
        assert streamed == whole.choices[0].text, i
        assert whole.choices[0].finish_reason in ("length", "stop")
    scheduler = server.state.serving.scheduler
    assert scheduler.busy == 0 and not scheduler.queue
    assert server.metric("meshlm_slots_busy") == 0 and server.metric("meshlm_queue_depth") == 0


def _slow(scheduler, seconds: float):
    generate = scheduler.engine.generate

    def slow(state, longest=None):
        time.sleep(seconds)
        return generate(state, longest)

    scheduler.engine.generate = slow
    return generate


def test_a_client_that_disconnects_frees_its_slot(server):
    scheduler = server.state.serving.scheduler
    fast = _slow(scheduler, 0.05)
    try:
        cancelled = server.metric('meshlm_requests_total{outcome="cancelled"}')
        body = {"model": "tiny", "prompt": "def main():", "max_tokens": 100, "stream": True, "ignore_eos": True}
        with server.http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one event, then hang up
        assert scheduler.busy == 1
        deadline = time.monotonic() + 10
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.busy == 0
        assert server.metric('meshlm_requests_total{outcome="cancelled"}') == cancelled + 1
        # a client that gives up on a non-streamed request (its timeout closes the connection)
        with pytest.raises(httpx.ReadTimeout):
            server.http.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 10  # the server looks for a disconnect every 0.5 s
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.busy == 0
        assert server.metric('meshlm_requests_total{outcome="cancelled"}') == cancelled + 2
    finally:
        scheduler.engine.generate = fast


def test_an_engine_failure_fails_only_its_requests(server):
    scheduler = server.state.serving.scheduler
    prefill = scheduler.engine.prefill
    poison = server.state.serving.tokenizer.encode("POISON")

    def failing(prompt, params, reuse=None):
        if prompt[-len(poison):] == poison:
            raise RuntimeError("device lost")
        return prefill(prompt, params, reuse)

    scheduler.engine.prefill = failing
    try:
        body = {"model": "tiny", "prompt": "x POISON", "max_tokens": 4}
        failed = server.http.post("/v1/completions", json=body)
        assert failed.status_code == 500 and "device lost" in failed.json()["error"]["message"]
        with pytest.raises(openai.APIError, match="device lost"):
            list(server.client().completions.create(model="tiny", prompt="x POISON", max_tokens=4, stream=True))
        good = server.http.post("/v1/completions", json={**body, "prompt": "x = 1"})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
        assert server.http.get("/health").status_code == 200
    finally:
        scheduler.engine.prefill = prefill


def test_health_while_loading_failing_and_stuck(loaded, engine):
    release = threading.Event()

    def slow_load(metrics):
        release.wait(30)
        return build_serving(loaded, metrics, model_name="tiny", stuck_after=0.3, engine=engine)

    running = Running(loaded, load=slow_load, wait=False)
    try:
        health = running.http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        loading = running.http.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert "loading" in _error(loading, 503) and "Retry-After" in loading.headers
        release.set()
        running.wait_ready()
        scheduler = running.state.serving.scheduler
        fast = _slow(scheduler, 2.0)
        try:
            waiting = threading.Thread(target=running.http.post, args=("/v1/completions",),
                                       kwargs={"json": {"model": "tiny", "prompt": "x", "max_tokens": 2}})
            waiting.start()
            deadline = time.monotonic() + 10  # the request reaches the slow step after its prefill (a busy
            stuck = running.http.get("/health")  # machine may take a while): poll, not a fixed sleep
            while stuck.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                stuck = running.http.get("/health")
            assert stuck.status_code == 503 and "stuck" in stuck.json()["detail"]
            waiting.join(30)
        finally:
            scheduler.engine.generate = fast
        assert running.http.get("/health").status_code == 200
    finally:
        running.close()

    def broken(metrics):
        raise FileNotFoundError("no such model file")

    failed = Running(loaded, load=broken, wait=False)
    try:
        deadline = time.monotonic() + 10
        while failed.http.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        health = failed.http.get("/health")
        assert health.status_code == 503 and "no such model file" in health.json()["detail"]
    finally:
        failed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_streams_then_exits(tokenizer_file, tmp_path):
    port = _free_port()
    keys = tmp_path / "keys.txt"
    keys.write_text("# test keys\n" + KEY + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "meshlm", "serve", "--preset", "tiny", "--tokenizer", tokenizer_file,
         "--port", str(port), "--slots", "1", "--api-keys-file", str(keys), "--cpu-devices", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MESHLM_API_KEYS": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            time.sleep(0.1)
        # one slot, twelve long streams: SIGTERM comes with the first token, eleven are still queued
        done, first = [], threading.Event()

        def stream(i):
            body = {"model": "tiny", "prompt": f"def f{i}():", "max_tokens": 120, "stream": True, "ignore_eos": True}
            events = []
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
            done.append((time.monotonic(), events[-1], json.loads(events[-2])["choices"][0]["finish_reason"]))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        first.wait(60)
        while True:  # every request received (queued, running or done): a request still being sent is not in
            metrics = httpx.get(url + "/metrics").text  # flight, and a closing server may drop it
            received = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(
                ("meshlm_queue_depth ", "meshlm_slots_busy ", 'meshlm_requests_total{outcome="length"}')))
            if received == 12:
                break
            assert time.monotonic() < deadline
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(url + "/health")
        for t in threads:
            t.join(120)
        assert len(done) == 12 and all(event == "[DONE]" and reason == "length" for _, event, reason in done)
        assert max(when for when, _, _ in done) > sent + 0.3  # streams ran on after the signal
        # uvicorn re-raises the signal once it has shut down: the status says "ended by SIGTERM"
        assert process.wait(60) == -signal.SIGTERM
        assert "Finished server process" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
