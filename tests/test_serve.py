"""The OpenAI-compatible server, through the official `openai` client and raw HTTP, on a free localhost port."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import byte_spelled_completions

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if get(f"{url}/health") == {"status": "ok"}:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture(scope="module")
def served(stories):
    """The server in this process (uvicorn on a thread), with its loaded model for reference computations."""
    import uvicorn

    from minillama.serve.app import create_app

    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, "stories260K", max_batch=8), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url)
    yield url, model, tokenizer
    server.should_exit = True
    thread.join(timeout=30)


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


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(served, client):
    _, model, tokenizer = served
    prompts = [f"Tim had {i} red" for i in range(8)]
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = client.completions.create(model="stories260K", prompt=prompts[i], max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [generate(model, tokenizer, p, num_samples=1, max_new_tokens=10, temperature=0, top_k=None)[0] for p in prompts]


BAD_REQUESTS = [
    ({"prompt": "hi", "bogus": 1}, "bogus", "unknown field 'bogus'"),
    ({"prompt": "hi", "temperature": 5}, "temperature", "less than or equal to 2"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "hi", "n": 100}, "n", "less than or equal to 16"),
    ({"prompt": "hi " * 600, "max_tokens": 4}, "prompt", "exceeds the model's context of 512 tokens"),
    ({"prompt": "hi", "max_tokens": 600}, "max_tokens", "exceeds the model's context"),
    ({"prompt": [], "max_tokens": 4}, "prompt", "empty list"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"max_tokens": 4}, "prompt", "Field required"),
]


@pytest.mark.parametrize("body, param, message", BAD_REQUESTS, ids=[b[1] + str(i) for i, b in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_a_400_naming_the_field_and_the_server_keeps_serving(served, body, param, message):
    url = served[0]
    status, answer = post(f"{url}/v1/completions", body)
    error = answer["error"]
    assert status == 400 and error["param"] == param and message in error["message"], error
    assert post(f"{url}/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_malformed_oversized_and_chat_requests_are_400(served):
    url = served[0]
    status, answer = post(f"{url}/v1/completions", b'{"prompt": ')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = post(f"{url}/v1/completions", {"prompt": "x" * 2_000_000})
    assert status == 400 and "larger than" in answer["error"]["message"]
    status, answer = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "base model without a chat template" in answer["error"]["message"]
    assert [m["id"] for m in get(f"{url}/v1/models")["data"]] == ["stories260K"]
    assert post(f"{url}/v1/completions", {"prompt": "still here", "max_tokens": 2})[0] == 200


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
        # uvicorn drains, then re-raises the SIGTERM it caught, so the exit status says what ended the server
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        process.kill()


@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium and chromium-driver")
def test_playground_streams_into_the_page_in_a_real_browser(served, tmp_path):
    """Headless Chromium opens the page, types a prompt, presses Generate, and the streamed text appears."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model, tokenizer = served
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url)
        for field, value in (("prompt", "Once upon a time"), ("max_tokens", "12"), ("temperature", "0")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("finished"))
        driver.save_screenshot(str(tmp_path / "playground.png"))  # an artifact beside the test, never in git
        shown = driver.find_element(By.ID, "completion").text
        status = driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
    expected = generate(model, tokenizer, "Once upon a time", num_samples=1, max_new_tokens=12, temperature=0, top_k=None)[0]
    assert shown == expected.strip() and status == "finished: length"


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
