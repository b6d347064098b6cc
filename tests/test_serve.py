"""The OpenAI-compatible server, through the official `openai` client and raw HTTP, on a free localhost port."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import byte_spelled_completions, free_port, serving, wait_until_up

from minillama.checkpoint import load_for_inference
from minillama.generate import generate

pytest.importorskip("fastapi", reason="needs the 'serve' extra")
openai = pytest.importorskip("openai", reason="the tests speak through the official openai client")


def post(url: str, body: dict | bytes, timeout: float = 60) -> tuple[int, dict]:
    """Raw HTTP POST of JSON (or of bytes as they are), for requests the official client would refuse to send."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(stories):
    """The server in this process (uvicorn on a thread), with its loaded model for reference computations."""
    from minillama.serve.app import create_app

    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    with serving(create_app(model, tokenizer, "stories260K", max_batch=8)) as url:
        yield url, model, tokenizer


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused")


def test_greedy_completion_equals_minillama_generate(served, client):
    _, model, tokenizer = served
    prompt = "Once upon a time, there was a"
    response = client.completions.create(model="stories260K", prompt=prompt, max_tokens=12, temperature=0)
    expected = generate(model, tokenizer, prompt, num_samples=1, max_new_tokens=12, temperature=0, top_k=None)[0]
    assert response.choices[0].text == expected and expected
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt)) and response.model == "stories260K"


def test_stream_equals_the_whole_response_for_the_same_seed_and_n_gives_several(client):
    kwargs = dict(model="stories260K", prompt=["The dog", "A cat"], max_tokens=16, temperature=1.0, top_p=0.9, seed=7, n=2)
    whole = client.completions.create(**kwargs)
    streamed = ["", "", "", ""]
    reasons = [None] * 4
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert streamed == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == [c.finish_reason for c in sorted(whole.choices, key=lambda c: c.index)]
    assert len(whole.choices) == 4 and len(set(streamed)) > 1  # 2 prompts x n=2, each row its own random stream
    assert client.completions.create(**kwargs).choices[3].text == streamed[3]  # reproducible


def test_stop_sequences_cut_the_text_before_them(served, client):
    _, model, tokenizer = served
    prompt = "Once upon a time, there was a"
    full = generate(model, tokenizer, prompt, num_samples=1, max_new_tokens=20, temperature=0, top_k=None)[0]
    stop = full[5:8]
    response = client.completions.create(model="stories260K", prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "\n\n\n"])
    assert response.choices[0].text == full[: full.index(stop)] and response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="stories260K", prompt=prompt, max_tokens=20,
                                                                          temperature=0, stop=stop, stream=True))
    assert streamed == full[: full.index(stop)]


def test_the_official_clients_streaming_loop_works_and_usage_comes_only_when_asked(client):
    kwargs = dict(model="stories260K", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(**kwargs))
    assert text == client.completions.create(**{**kwargs, "stream": False}).choices[0].text and text
    chunks = list(client.completions.create(**kwargs, stream_options={"include_usage": True}))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_usage_counts_each_prompt_once_whatever_n(served, client):
    tokenizer = served[2]
    response = client.completions.create(model="stories260K", prompt=["Tim ran", "A big dog"], n=3, max_tokens=4, temperature=1, seed=0)
    prompt_tokens = len(tokenizer.encode("Tim ran")) + len(tokenizer.encode("A big dog"))
    assert len(response.choices) == 6 and response.usage.prompt_tokens == prompt_tokens  # not 3 x prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens


def test_models_are_named_as_openai_names_them_and_unknown_routes_answer_in_its_shape(served, client):
    url = served[0]
    assert client.models.retrieve("stories260K").id == "stories260K"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and "'gpt-4' does not exist" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(urllib.request.Request(url + path, method=method), timeout=10)
        answer = json.loads(error.value.read())
        assert error.value.code == status and answer["error"]["type"] == "invalid_request_error" and path in answer["error"]["message"]


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(served, client, monkeypatch):
    from minillama.inference.engine import Engine
    from minillama.serve.worker import EngineWorker

    _, model, tokenizer = served
    prompts = [f"Tim had {i} red" for i in range(8)]
    answers = [None] * len(prompts)
    # The engine's first decode waits until every request has arrived, so that how many rows decode together
    # depends on the batching alone, not on how fast the threads start.
    jobs, all_arrived, rows_decoded = [], threading.Event(), []
    submit, decode = EngineWorker.submit, Engine._decode

    def counted_submit(self, job):
        submit(self, job)
        jobs.append(job)
        if len(jobs) == len(prompts):
            all_arrived.set()

    def recorded_decode(self, running):
        all_arrived.wait(timeout=60)
        rows_decoded.append(len(running))
        return decode(self, running)

    monkeypatch.setattr(EngineWorker, "submit", counted_submit)
    monkeypatch.setattr(Engine, "_decode", recorded_decode)

    def ask(i):
        answers[i] = client.completions.create(model="stories260K", prompt=prompts[i], max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(rows_decoded) == len(prompts)  # all eight decode as one batch
    assert answers == [generate(model, tokenizer, p, num_samples=1, max_new_tokens=10, temperature=0, top_k=None)[0] for p in prompts]


BAD_REQUESTS = [
    ({"prompt": "hi", "bogus": 1}, "bogus", "unknown field 'bogus'"),
    ({"prompt": "hi", "temperature": 5}, "temperature", "less than or equal to 2"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens 0 returns nothing; set echo"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "hi", "n": 100}, "n", "less than or equal to 16"),
    ({"prompt": "hi " * 600, "max_tokens": 4}, "prompt", "exceeds the model's context of 512 tokens"),
    ({"prompt": "hi", "max_tokens": 600}, "max_tokens", "exceeds the model's context of 512 tokens; at most 509 fit: lower max_tokens"),
    ({"prompt": [], "max_tokens": 4}, "prompt", "empty list"),
    ({"prompt": [[]], "max_tokens": 4}, "prompt", "a token-id prompt is empty"),
    ({"prompt": [1, 512], "max_tokens": 4}, "prompt", "token id 512 is outside the vocabulary (0 to 511)"),
    ({"prompt": [1, -3], "max_tokens": 4}, "prompt", "token id -3 is outside the vocabulary"),
    ({"prompt": [True, 5]}, "prompt", "Input should be"),
    ({"prompt": "a\ud800b"}, "prompt", "lone surrogate ('\\ud800')"),
    ({"prompt": "hi", "stop": ["\udfff"]}, "stop", "lone surrogate"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"prompt": "hi", "seed": 18446744073709551616}, "seed", "less than or equal to 9223372036854775807"),
    ({"prompt": "hi", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": "hi", "best_of": 3}, "best_of", "best_of 3 is not supported"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", "not supported; leave it out or set it to 0"),
    ({"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias", "logit_bias is not supported"),
    ({"prompt": "hi", "suffix": "end"}, "suffix", "suffix (insertion) is not supported"),
    ({"prompt": ["hi"] * 200, "n": 16}, "prompt", "200 prompts x n=16 is 3,200 completions; this server queues at most 256"),
    ({"prompt": "hi", "stream_options": {"include_usage": True, "x": 1}}, "stream_options", "unknown field 'stream_options.x'"),
    ({"max_tokens": 4}, "prompt", "Field required"),
    # strict types, as OpenAI's API takes them: a string is not a number, nor "yes" a boolean
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"prompt": "hi", "n": "2"}, "n", "valid integer"),
    ({"prompt": "hi", "logprobs": "5"}, "logprobs", "valid integer"),
    ({"prompt": "hi", "seed": "1"}, "seed", "valid integer"),
    ({"prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"prompt": "hi", "echo": "yes"}, "echo", "valid boolean"),
    ({"prompt": "hi", "temperature": "0.5"}, "temperature", "valid number"),
]


@pytest.mark.parametrize("body, param, message", BAD_REQUESTS, ids=[b[1] + str(i) for i, b in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_a_400_naming_the_field_and_the_server_keeps_serving(served, body, param, message):
    url = served[0]
    status, answer = post(f"{url}/v1/completions", body)
    error = answer["error"]
    assert status == 400 and error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert post(f"{url}/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_json_body_is_read_as_json_whatever_its_content_type(served):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; the body is JSON all the same."""
    for content_type in ("application/x-www-form-urlencoded", None):
        request = urllib.request.Request(f"{served[0]}/v1/completions", data=b'{"prompt": "Tim", "max_tokens": 3}',
                                         headers={"Content-Type": content_type} if content_type else {})
        if content_type is None:
            request.remove_header("Content-type")  # urllib adds the form type to any body by default
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 3
    status, answer = post(f"{served[0]}/v1/completions", b"prompt=Tim")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]


@pytest.mark.parametrize("request_bytes", [b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                           b"Content-Length: -5\r\n\r\n"])
def test_malformed_http_is_answered_in_openais_error_shape(served, request_bytes):
    import socket
    from urllib.parse import urlparse

    address = urlparse(served[0])
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(request_bytes)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("the request is not valid HTTP")
    assert get(f"{served[0]}/health") == {"status": "ok"}


def test_every_accepted_seed_works_with_several_completions(served):
    """Choice i samples with seed + i, which wraps around past 2^63 - 1: the largest seed works with n and with a
    list of prompts, and its second choice samples as seed 0 does."""
    url = served[0]
    body = {"prompt": ["Once", "Lily"], "seed": 2**63 - 1, "max_tokens": 6, "temperature": 1.0, "n": 2}
    status, answer = post(f"{url}/v1/completions", body)
    assert status == 200 and len(answer["choices"]) == 4, answer
    from_zero = post(f"{url}/v1/completions", {**body, "prompt": "Once", "seed": 0, "n": 1})[1]["choices"][0]["text"]
    assert answer["choices"][1]["text"] == from_zero


def test_every_openai_field_at_its_no_op_value_is_accepted(served, client):
    """What client libraries send by default (LangChain's OpenAI wrapper, SDKs) must not be refused."""
    response = client.completions.create(model="stories260K", prompt="Tim", max_tokens=3, temperature=0, best_of=1, echo=False,
                                         frequency_penalty=0, presence_penalty=0, logit_bias={}, logprobs=None, suffix=None,
                                         user="someone", stop=None, stream=False, n=1, top_p=1, seed=None)
    assert response.choices[0].finish_reason == "length"


def test_tiny_temperatures_are_greedy(served, client):
    _, model, tokenizer = served
    greedy = client.completions.create(model="stories260K", prompt="Once upon", max_tokens=10, temperature=0).choices[0].text
    assert post(f"{served[0]}/v1/completions", {"prompt": "Once upon", "max_tokens": 10, "temperature": 1e-45})[1]["choices"][0]["text"] == greedy


def test_malformed_oversized_and_chat_requests_are_refused_in_openais_shape(served):
    url = served[0]
    status, answer = post(f"{url}/v1/completions", b'{"prompt": ')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = post(f"{url}/v1/completions", {"prompt": "x" * 2_000_000})
    assert status == 413 and "larger than 1,048,576 bytes" in answer["error"]["message"]
    status, answer = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "base model without a chat template" in answer["error"]["message"]
    assert [m["id"] for m in get(f"{url}/v1/models")["data"]] == ["stories260K"]
    assert post(f"{url}/v1/completions", {"prompt": "still here", "max_tokens": 2})[0] == 200


def test_a_chunked_upload_cannot_pass_the_body_limit_or_block_the_server(served):
    """A chunked body declares no length: it is counted while read, and the read stops at the limit."""
    import http.client

    host, port = served[0].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"x" * (1 << 20)
    status = None
    try:
        for _ in range(32):  # 32 MB, unless the server answers (and closes) first
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
        status = connection.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed while the client was still sending
    finally:
        connection.close()
    assert status in (None, 413)
    assert get(f"{served[0]}/health") == {"status": "ok"}  # the server goes on serving


def test_a_host_header_that_is_not_allowed_is_refused(served):
    """A page on another site that rebinds its name to 127.0.0.1 arrives with its own name as Host."""
    request = urllib.request.Request(f"{served[0]}/v1/models", headers={"Host": "evil.example:8000"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    answer = json.loads(error.value.read())
    assert error.value.code == 400 and "'evil.example:8000' is not one this server answers to" in answer["error"]["message"]
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert urllib.request.urlopen(urllib.request.Request(f"{served[0]}/health", headers={"Host": host}), timeout=10).status == 200


@pytest.mark.slow
def test_sigterm_finishes_the_stream_in_flight_then_exits(stories, tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "minillama", "serve", str(stories), "--port", str(port), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}")
        events = []
        body = {"prompt": "Once", "max_tokens": 300, "temperature": 1.0, "seed": 1, "stream": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        process.send_signal(signal.SIGTERM)  # mid-stream: the server must finish this one first
        assert events[-1] == "[DONE]"
        finish = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert finish in (["length"], ["stop"]) and len(events) > 3
        # uvicorn drains, then re-raises the SIGTERM it caught: the command's own exit, as every command's on SIGTERM
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        assert process.stderr.read().splitlines()[-1] == ("minillama: the server stopped on SIGTERM, after the requests in "
                                                          "flight had finished")
    finally:
        process.kill()


@contextlib.contextmanager
def headless_chrome(tmp_path):
    """Debian's Chromium, headless, driven by selenium; closed after the block."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def fill_in(driver, **fields: str) -> None:
    """Type each value into the page's field of that id, replacing what it held."""
    from selenium.webdriver.common.by import By

    for field, value in fields.items():
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium and chromium-driver")
def test_playground_streams_into_the_page_in_a_real_browser(served, tmp_path):
    """Headless Chromium opens the page, types a prompt, presses Generate, and the streamed text appears, each token
    also shown with its log-probability."""
    pytest.importorskip("selenium.webdriver", reason="needs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model, tokenizer = served
    with headless_chrome(tmp_path) as driver:
        driver.get(url)
        fill_in(driver, prompt="Once upon a time", max_tokens="12", temperature="0")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("finished"))
        driver.save_screenshot(str(tmp_path / "playground.png"))  # an artifact beside the test, never in git
        shown = driver.find_element(By.ID, "completion").text
        status = driver.find_element(By.ID, "status").text
        tokens = driver.execute_script("return [...document.querySelectorAll('#tokens .token')].map(t => [t.textContent, t.title])")
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("100000")  # past the context, refused by the server: the page says so, in the error colour
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("error"))
        error = driver.find_element(By.ID, "status")
        error_colour, error_class = error.value_of_css_property("color"), error.get_attribute("class")
    assert error_class == "error" and error_colour == "rgba(176, 0, 32, 1)"
    expected = generate(model, tokenizer, "Once upon a time", num_samples=1, max_new_tokens=12, temperature=0, top_k=None)[0]
    assert shown == expected.strip() and status == "finished: length"
    assert len(tokens) == 12 and "".join(text for text, _ in tokens).strip() == expected.strip()
    assert all(title.startswith("log-probability -") and "likeliest: " in title for _, title in tokens)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium and chromium-driver")
def test_playground_stops_a_generation_keys_and_keeps_labels_beside_their_inputs(served, tmp_path):
    """Generate is disabled while a long generation streams; Stop ends it (the server frees its row) and enables
    Generate again; Ctrl-Enter in the prompt generates; at a phone's, a laptop's and a desktop's width every label
    stays one box on one line with its input."""
    pytest.importorskip("selenium.webdriver", reason="needs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url = served[0]
    with headless_chrome(tmp_path) as driver:
        driver.get(url)
        fill_in(driver, prompt="Once", max_tokens="400", temperature="1")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_element(By.ID, "completion").text) > 0)
        during = [driver.find_element(By.ID, name).is_enabled() for name in ("generate", "stop")]
        driver.find_element(By.ID, "stop").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text == "stopped")
        after = [driver.find_element(By.ID, name).is_enabled() for name in ("generate", "stop")]
        wait_until_running(url, 0)  # the aborted stream's row is freed
        prompt = driver.find_element(By.ID, "prompt")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("5")
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("finished"))
        layouts = {}
        for width in (390, 800, 1280):
            driver.set_window_size(width, 900)
            layouts[width] = driver.execute_script(
                "return [...document.querySelectorAll('label')].map(l => { const input = l.querySelector('input').getBoundingClientRect();"
                " const box = l.getBoundingClientRect(); return l.getClientRects().length === 1 && input.top >= box.top - 1 &&"
                " input.bottom <= box.bottom + 1 && box.height < 2 * input.height; })")
        driver.save_screenshot(str(tmp_path / "playground_narrow.png"))
    assert during == [False, True] and after == [True, False]
    assert all(all(fits) and len(fits) == 5 for fits in layouts.values()), layouts


@pytest.mark.slow
def test_characters_spelled_in_byte_tokens_arrive_whole_streamed_or_not_with_or_without_stop(served, client):
    """stories260K's tok512 spells most characters in bytes; a text must equal the decode of its tokens, however
    it is delivered, and an unrelated stop sequence must not change it."""
    _, model, tokenizer = served
    cases = byte_spelled_completions(model, tokenizer, "Once upon a time", range(6))
    assert len(cases) >= 3, "the seed search should find byte-spelled characters (tok512, temperature 1)"
    for seed, expected in cases:
        for stop in (None, "zzzz"):
            kwargs = dict(model="stories260K", prompt="Once upon a time", max_tokens=48, temperature=1, seed=seed, stop=stop)
            assert client.completions.create(**kwargs).choices[0].text == expected, (seed, stop)
            assert "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)) == expected, (seed, stop)


def reference_log_probs(model, tokens):
    """log p(token t | tokens before it) for t >= 1, and the log-softmax rows, from the plain causal forward."""
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(torch.tensor([tokens]))[0][0].float(), dim=-1)
    return [float(log_softmax[t - 1, tokens[t]]) for t in range(1, len(tokens))], log_softmax


def test_echo_and_logprobs_of_a_token_prompt_are_the_plain_forwards(served, client):
    """What lm-evaluation-harness's API models ask for a log-likelihood: token ids, echo, logprobs, one token."""
    _, model, tokenizer = served
    prompt = tokenizer.encode("Once upon a time, there was a little girl named Lily.")
    response = client.completions.create(model="stories260K", prompt=prompt, echo=True, logprobs=3, max_tokens=1, temperature=0)
    logprobs = response.choices[0].logprobs
    expected, log_softmax = reference_log_probs(model, prompt)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(logprobs.token_logprobs[1 : len(prompt)], expected)) < 1e-4
    generated = int(log_softmax[-1].argmax())
    assert len(logprobs.tokens) == len(prompt) + 1 and abs(logprobs.token_logprobs[-1] - float(log_softmax[-1].max())) < 1e-4
    top = log_softmax[-1].topk(3)
    assert list(logprobs.top_logprobs[-1].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert response.choices[0].text == tokenizer.decode(prompt) + tokenizer.decode(prompt + [generated])[len(tokenizer.decode(prompt)):]
    assert logprobs.text_offset[-1] == len(tokenizer.decode(prompt))
    assert response.usage.prompt_tokens == len(prompt)  # token prompts get no BOS added


def test_max_tokens_0_with_echo_scores_the_prompt_only_and_streams_the_same(served, client):
    _, model, tokenizer = served
    prompts = [tokenizer.encode("Tim had a dog."), tokenizer.encode("The sun was hot and bright")]
    response = client.completions.create(model="stories260K", prompt=prompts, echo=True, logprobs=0, max_tokens=0)
    for choice, prompt in zip(sorted(response.choices, key=lambda c: c.index), prompts):
        assert choice.finish_reason == "length" and choice.text == tokenizer.decode(prompt)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(reference_log_probs(model, prompt)[0], abs=1e-4)
    streamed = list(client.completions.create(model="stories260K", prompt=prompts[0], echo=True, logprobs=0, max_tokens=0, stream=True))
    assert [c.choices[0].text for c in streamed] == [tokenizer.decode(prompts[0])]
    assert streamed[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(response.choices[0].logprobs.token_logprobs[1:], abs=1e-4)


def test_streamed_logprobs_are_the_whole_responses(client):
    kwargs = dict(model="stories260K", prompt="Lily saw a", max_tokens=12, temperature=0.8, seed=3, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)]
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert [t for c in chunks for t in c.token_logprobs] == pytest.approx(whole.token_logprobs)
    assert [t for c in chunks for t in c.text_offset] == whole.text_offset


def test_tokenizer_endpoints_speak_vllms_shapes(served):
    url, _, tokenizer = served
    status, answer = post(f"{url}/tokenize", {"prompt": "Once upon a time"})
    assert status == 200 and answer["tokens"] == tokenizer.encode("Once upon a time") and answer["max_model_len"] == 512
    assert post(f"{url}/tokenize", {"prompt": "Once", "add_special_tokens": False})[1]["tokens"] == tokenizer.encode("Once", bos=False)
    assert post(f"{url}/detokenize", {"tokens": answer["tokens"]})[1] == {"prompt": "Once upon a time"}
    assert get(f"{url}/tokenizer_info")["vocab_size"] == 512
    status, answer = post(f"{url}/detokenize", {"tokens": [1, 600]})
    assert status == 400 and answer["error"]["param"] == "tokens"


def metric_samples(url: str) -> dict[str, float]:
    """The server's /metrics as {name[labels]: value}, read by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return {s.name + str(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(response.read().decode())
                for s in f.samples}


def wait_until_running(url: str, count: int) -> None:
    """Until the engine decodes `count` completions (an event to wait for, not a time to guess)."""
    while metric_samples(url)["minillama_num_requests_running[]"] < count:
        time.sleep(0.01)


def test_metrics_count_requests_tokens_and_latency_in_prometheus_format(served, client):
    def samples():
        return metric_samples(served[0])

    before = samples()
    client.completions.create(model="stories260K", prompt="Tim", max_tokens=5, temperature=0, n=2)
    after = samples()
    assert after["minillama_generation_tokens_total[]"] - before["minillama_generation_tokens_total[]"] == 10
    assert after["minillama_time_to_first_token_seconds_count[]"] - before["minillama_time_to_first_token_seconds_count[]"] == 2
    assert after["minillama_request_success_total[('finished_reason', 'length')]"] - \
        before.get("minillama_request_success_total[('finished_reason', 'length')]", 0) == 2
    assert after["minillama_num_requests_running[]"] == 0


@pytest.mark.slow
def test_a_full_queue_answers_429_and_takes_requests_again_once_it_drains(stories):
    from minillama.serve.app import create_app

    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    with serving(create_app(model, tokenizer, "stories260K", max_batch=2, max_queued=2)) as url:
        long = threading.Thread(target=post, args=(f"{url}/v1/completions", {"prompt": "Once", "max_tokens": 400, "temperature": 0}))
        long.start()
        wait_until_running(url, 1)
        status, answer = post(f"{url}/v1/completions", {"prompt": "Tim", "max_tokens": 4, "n": 2})
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded" and "retry later" in answer["error"]["message"]
        assert post(f"{url}/v1/completions", {"prompt": "Tim", "max_tokens": 4})[0] == 200  # one more fits
        long.join()
        assert post(f"{url}/v1/completions", {"prompt": "Tim", "max_tokens": 4, "n": 2})[0] == 200


def test_a_failing_step_fails_its_requests_with_500_and_the_engine_goes_on(stories, monkeypatch):
    from minillama.inference.engine import Engine
    from minillama.serve.app import create_app

    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    original, calls = Engine._decode, []

    def fails_once(self, running):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, running)

    monkeypatch.setattr(Engine, "_decode", fails_once)
    with serving(create_app(model, tokenizer, "stories260K")) as url:
        status, answer = post(f"{url}/v1/completions", {"prompt": "Once", "max_tokens": 8})
        assert status == 500 and answer["error"]["type"] == "server_error" and "simulated" in answer["error"]["message"]
        assert post(f"{url}/v1/completions", {"prompt": "Once", "max_tokens": 8})[0] == 200
        assert get(f"{url}/health") == {"status": "ok"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the point
def test_if_the_engine_thread_dies_health_says_so_requests_get_503_and_the_server_is_told(stories, monkeypatch):
    from minillama.serve.app import create_app
    from minillama.serve.worker import EngineWorker

    def dies(self, update):
        raise SystemError("a bug in the worker (simulated)")

    monkeypatch.setattr(EngineWorker, "_deliver", dies)
    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    stopped = []
    with serving(create_app(model, tokenizer, "stories260K", on_stop=stopped.append)) as url:
        status, answer = post(f"{url}/v1/completions", {"prompt": "Once", "max_tokens": 8})
        assert status == 503 and "the engine stopped (SystemError: a bug in the worker (simulated))" in answer["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{url}/health", timeout=10)
        assert error.value.code == 503
        assert post(f"{url}/v1/completions", {"prompt": "Once", "max_tokens": 8})[0] == 503
    assert stopped == ["SystemError: a bug in the worker (simulated)"]


@pytest.mark.slow
def test_short_requests_do_not_wait_for_a_long_one(served):
    """Continuous batching: 8 short requests sent while a 400-token one runs join at the next step and all finish
    while it still runs (a batch-at-a-time server made them wait for the whole long request). How much sooner is a
    speed, measured by bench/serve_load.py; this checks the order."""
    url = served[0]
    finished = []

    def send(name, body):
        assert post(f"{url}/v1/completions", body)[0] == 200
        finished.append(name)

    long = threading.Thread(target=send, args=("long", {"prompt": "Once", "max_tokens": 400, "temperature": 0, "stop": None}))
    long.start()
    wait_until_running(url, 1)
    shorts = [threading.Thread(target=send, args=(i, {"prompt": f"Tim {i}", "max_tokens": 8, "temperature": 0}))
              for i in range(8)]
    for thread in shorts:
        thread.start()
    for thread in [long, *shorts]:
        thread.join()
    assert finished[-1] == "long" and sorted(finished[:-1]) == list(range(8)), finished


def test_a_port_in_use_or_a_host_that_does_not_resolve_is_one_line_before_anything_loads(stories, capsys):
    import socket

    from minillama.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(stories), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minillama: error: cannot listen on 127.0.0.1:{port} (Address already in use)") and "serving" not in err
    assert main(["serve", str(stories), "--host", "no.such.host.invalid"]) == 2
    assert "--host 'no.such.host.invalid' does not resolve" in capsys.readouterr().err


def test_the_playground_starts_from_the_checkpoints_eval_prompt_and_offers_top_k(stories):
    from minillama.serve.app import create_app, first_eval_prompt

    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    with serving(create_app(model, tokenizer, "stories260K", max_batch=1, start_prompt='Tom & "Lily" <3')) as url:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
    assert '<textarea id="prompt" name="prompt" placeholder="text for the model to continue">Tom &amp; &quot;Lily&quot; &lt;3</textarea>' in page
    assert '<input id="top_k" type="number" value="50"' in page and "body.top_k = Number(topK)" in page
    assert first_eval_prompt({"eval_prompts": ["ROMEO:", "JULIET:"]}) == "ROMEO:" and first_eval_prompt({}) == ""


def test_logprobs_name_a_byte_token_that_is_a_whole_character_by_its_text(served):
    """A byte token below 0x80 (a newline) is a whole character, named by its text; one byte of a longer character
    (0xE6 of a CJK character) keeps OpenAI's "bytes:" form, as no text can name it."""
    from minillama.serve.protocol import token_text

    tokenizer = served[2]
    byte_token = {tokenizer.byte_value(i): i for i in range(tokenizer.vocab_size) if tokenizer.is_byte(i)}
    assert token_text(tokenizer, byte_token[0x0A]) == "\n" and token_text(tokenizer, byte_token[0x09]) == "\t"
    assert token_text(tokenizer, byte_token[0xE6]) == "bytes:\\xe6"
    newline = tokenizer.encode("a\nb", bos=False)
    status, answer = post(f"{served[0]}/v1/completions", {"prompt": [1, *newline], "max_tokens": 1, "echo": True,
                                                        "logprobs": 0, "temperature": 0})
    assert status == 200 and "\n" in answer["choices"][0]["logprobs"]["tokens"]


def test_each_request_is_one_access_log_line_with_status_time_and_tokens_but_no_text(served, caplog):
    import logging
    import re

    _, _, tokenizer = served
    caplog.set_level(logging.INFO, logger="minillama.serve.access")
    assert post(f"{served[0]}/v1/completions", {"prompt": "Tim the secret", "max_tokens": 3, "temperature": 0})[0] == 200
    assert post(f"{served[0]}/v1/completions", {"prompt": "hi", "n": 100})[0] == 400
    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "minillama.serve.access"]

    deadline = time.monotonic() + 30  # a line is written once its response is sent, which the client may see first
    while not any(" 400 " in line for line in lines()) and time.monotonic() < deadline:
        time.sleep(0.01)
    prompt_tokens = len(tokenizer.encode("Tim the secret", bos=True))
    completed = re.compile(r'127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200 \d+\.\d\d s, tokens '
                           rf"{prompt_tokens} in 3 out")
    refused = re.compile(r'127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 400 \d+\.\d\d s')
    assert any(completed.fullmatch(line) for line in lines()) and any(refused.fullmatch(line) for line in lines()), lines()
    assert not any("secret" in line for line in lines())
