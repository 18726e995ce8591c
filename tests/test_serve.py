"""``memgen serve`` as users run it: a real server subprocess on a loopback port, driven by the official openai client.

The tiny model is saved to disk with a chat template and a randomised adapter, so memory
always and the trigger change the outputs. "Alone" references come from the same server
answering one request at a time, or from ``memgen generate`` in another process.
"""

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import make_memgen

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

KEY = "sk-test"


@pytest.fixture(scope="module")
def tiny_dirs(saved_tiny):
    return saved_tiny["root"], str(saved_tiny["base"]), str(saved_tiny["adapter"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root, model_args, *flags, name="srv"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"{name}-{self.port}.log"
        cmd = [sys.executable, "-m", "memgen", "serve", *model_args, "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"server did not come up:\n{self.log.read_text()}")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as reply:
            return reply.status, reply.read().decode()

    def post(self, path, body: bytes | dict, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def metric(self, name) -> float:
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def async_client(self, key="unused"):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_dirs):
    root, base, adapter = tiny_dirs
    srv = Server(root, ["--model", base, "--adapter", adapter], "--max-rows", "16", "--prefill-chunk", "16")
    yield srv
    srv.stop()


def generate_cli(base, adapter, prompt, *flags):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "generate",
            "--model",
            base,
            "--adapter",
            adapter,
            "--prompt",
            prompt,
            "--json",
        ]
        + list(flags),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("memory", ["off", "always", "trigger"])
def test_greedy_completion_equals_memgen_generate(server, tiny_dirs, memory):
    _, base, adapter = tiny_dirs
    prompt = "The cat sat on the mat, then"
    want = generate_cli(base, adapter, prompt, "--memory", memory, "--max-new-tokens", "24")
    got = server.client().completions.create(
        model="base", prompt=prompt, max_tokens=24, temperature=0, extra_body={"memgen": {"memory": memory}}
    )
    choice = got.choices[0]
    assert choice.text == want["text"]
    assert got.usage.completion_tokens == len(want["token_ids"])
    woven = [i["position"] for i in want["insertions"] if i["inserted"]]
    assert [i["position"] for i in choice.model_extra["memgen"]["insertions"]] == woven
    if memory != "off":
        assert woven and got.usage.model_extra["memgen"]["latent_slots"] > 0
    chat = server.client().chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=24,
        temperature=0,
        extra_body={"memgen": {"memory": memory}},
    )
    want_chat = generate_cli(base, adapter, prompt, "--memory", memory, "--max-new-tokens", "24", "--use-chat-template")
    assert chat.choices[0].message.content == want_chat["text"]


def test_openai_client_sync_async_streaming_and_not(server):
    client = server.client()
    kw = dict(model="base", max_tokens=30, temperature=0, extra_body={"memgen": {"memory": "always"}})
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, world."}]
    whole = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kw)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in whole.choices[0].logprobs.content)
    stream = client.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **kw
    )
    pieces, finish, usage, insertions = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
            insertions += (c.model_extra.get("memgen") or {}).get("insertions", [])
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert insertions == whole.choices[0].model_extra["memgen"]["insertions"]

    async def run_async():
        aclient = server.async_client()
        single = await aclient.completions.create(prompt="e m e, a.", **kw)
        streamed = await aclient.completions.create(prompt="e m e, a.", stream=True, **kw)
        text = "".join([c.choices[0].text async for c in streamed if c.choices])
        models = await aclient.models.list()
        await aclient.close()
        return single, text, models

    single, text, models = asyncio.run(run_async())
    assert text == single.choices[0].text and single.object == "text_completion"
    assert [m.id for m in models.data] == ["base"]


def test_stop_strings_n_and_seeds(server):
    client = server.client()
    base = client.completions.create(model="base", prompt="Hello, world.", max_tokens=30, temperature=0)
    text = base.choices[0].text
    stop = text[5:7]
    cut = client.completions.create(model="base", prompt="Hello, world.", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="base", prompt="a", max_tokens=20, temperature=1.0, seed=7, n=3)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1


REQUESTS = [
    (f"{w} sat on the mat, then", n, m)
    for w, n, m in zip("abcdefghijklmnop", range(8, 72, 4), ["off", "always", "trigger", "random:0.5"] * 4)
]


def test_sixteen_concurrent_clients_each_get_what_they_get_alone(server):
    def kwargs(prompt, length, memory):
        return dict(
            model="base",
            prompt=prompt,
            max_tokens=length,
            temperature=0,
            seed=3,
            extra_body={"memgen": {"memory": memory, "max_insertions": 3}},
        )

    client = server.client()
    alone = [client.completions.create(**kwargs(*r)).choices[0] for r in REQUESTS]

    async def together():
        aclient = server.async_client()

        async def one(i, r):
            await asyncio.sleep(0.01 * i)  # arrivals spread over the running batch's steps
            if i % 2:
                stream = await aclient.completions.create(stream=True, **kwargs(*r))
                return "".join([c.choices[0].text async for c in stream if c.choices])
            return (await aclient.completions.create(**kwargs(*r))).choices[0]

        out = await asyncio.gather(*(one(i, r) for i, r in enumerate(REQUESTS)))
        await aclient.close()
        return out

    peak_before = server.metric("memgen_engine_steps_total")
    results = asyncio.run(together())
    for i, (got, want) in enumerate(zip(results, alone)):
        if isinstance(got, str):
            assert got == want.text, f"client {i} (streamed)"
        else:
            assert got.text == want.text, f"client {i}"
            ours, theirs = got.model_extra["memgen"], want.model_extra["memgen"]
            # Where latents went is exact; P(invoke) is float32 and moves ~1e-7 with the batch around it.
            assert ours["declined"] == theirs["declined"], f"client {i}"
            assert [x["position"] for x in ours["insertions"]] == [x["position"] for x in theirs["insertions"]]
            assert [x["p_invoke"] for x in ours["insertions"]] == pytest.approx(
                [x["p_invoke"] for x in theirs["insertions"]], abs=1e-5
            ), f"client {i}"
    # 16 requests of 8..68 tokens one at a time take ~600 steps; together far fewer.
    assert server.metric("memgen_engine_steps_total") - peak_before < sum(r[1] for r in REQUESTS) / 2


def test_a_disconnected_stream_frees_its_rows_and_others_go_on(server):
    client = server.client()
    long = dict(model="base", max_tokens=700, temperature=0, extra_body={"memgen": {"memory": "always"}})
    want = client.completions.create(prompt="e m e, a.", **long).choices[0].text
    cancelled = server.metric("memgen_requests_cancelled_total")
    result = {}

    def survivor():
        stream = server.client().completions.create(prompt="e m e, a.", stream=True, **long)
        result["text"] = "".join(c.choices[0].text for c in stream if c.choices)

    thread = threading.Thread(target=survivor)
    thread.start()
    doomed = client.completions.create(prompt="Hello, world.", stream=True, **long)
    for i, _ in enumerate(doomed):
        if i == 3:
            break
    doomed.close()
    deadline = time.time() + 30
    while server.metric("memgen_requests_cancelled_total") < cancelled + 1 and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("memgen_requests_cancelled_total") == cancelled + 1
    assert thread.is_alive(), "the surviving stream should still be running when the other is cancelled"
    thread.join(120)
    assert result["text"] == want
    assert server.metric("memgen_running_rows") == 0


def test_a_server_with_experience_weaves_what_it_retrieves_as_generate_does(tiny_dirs, tmp_path):
    from test_retrieval_weaving import RECORDS

    from memgen.cli import load_model
    from memgen.config import GenerateConfig
    from memgen.experience import ExperienceRecord, ExperienceStore
    from memgen.experience.weaving import open_reader
    from memgen.serving.config import ServeConfig

    root, base, adapter = tiny_dirs
    store = tmp_path / "store"
    with ExperienceStore(store, retriever="bm25") as s:
        s.add_many(
            ExperienceRecord(task="toy", input=i, trajectory=t, success=ok, reward=float(ok)) for i, t, ok in RECORDS
        )
    flags = ("--experience", str(store), "--experience-embedder", "bm25", "--retrieval-top-p", "2")
    srv = Server(root, ["--model", base, "--adapter", adapter], *flags, "--memory", "always", name="experience")
    prompt = "The cat sat on the mat, then"
    try:
        got = srv.client().completions.create(model="base", prompt=prompt, max_tokens=24, temperature=0)
    finally:
        srv.stop()
    model, _ = load_model(base, adapter)
    config = ServeConfig(experience=str(store), experience_embedder="bm25", retrieval_top_p=2)
    want = model.generate(
        [prompt], GenerateConfig(memory="always", max_new_tokens=24), experience=open_reader(config, model)
    ).completions[0]
    assert got.choices[0].text == want.text
    served = got.choices[0].model_extra["memgen"]["insertions"]
    woven = [i for i in want.insertions if i.inserted]
    assert [(i["position"], i["retrieved"]) for i in served] == [(i.position, i.retrieved) for i in woven]
    assert all(i["retrieved"] for i in served)  # every insertion read the store


@pytest.fixture(scope="module")
def strict_server(tiny_dirs):
    root, base, adapter = tiny_dirs
    srv = Server(
        root,
        ["--model", base, "--adapter", adapter],
        *("--api-key", KEY, "--max-rows", "2", "--max-queue", "0", "--max-prompt-tokens", "50"),
        *("--max-body-bytes", "20000", "--max-n", "2"),
        name="strict",
    )
    yield srv
    srv.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMP = {"model": "base", "prompt": "hi", "max_tokens": 4}
BAD_REQUESTS = [
    # (what, path, body, headers, status)
    ("no API key", "/v1/chat/completions", CHAT, {}, 401),
    ("wrong API key", "/v1/chat/completions", CHAT, {"Authorization": "Bearer nope"}, 401),
    ("malformed JSON", "/v1/chat/completions", b'{"model": "base", "messages": [', AUTH, 400),
    ("body is a list", "/v1/chat/completions", b"[1, 2]", AUTH, 422),
    ("no model", "/v1/completions", {"prompt": "hi"}, AUTH, 422),
    ("unknown model", "/v1/completions", {**COMP, "model": "gpt-9"}, AUTH, 404),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, AUTH, 422),
    ("messages not a list", "/v1/chat/completions", {**CHAT, "messages": "hi"}, AUTH, 422),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, AUTH, 422),
    ("negative max_tokens", "/v1/completions", {**COMP, "max_tokens": -5}, AUTH, 422),
    ("zero max_tokens", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, AUTH, 422),
    ("max_tokens beyond the context", "/v1/completions", {**COMP, "max_tokens": 10**9}, AUTH, 400),
    ("max_tokens a string", "/v1/completions", {**COMP, "max_tokens": "ten"}, AUTH, 422),
    ("temperature 5", "/v1/completions", {**COMP, "temperature": 5}, AUTH, 422),
    ("top_p 0", "/v1/completions", {**COMP, "top_p": 0}, AUTH, 422),
    ("n 0", "/v1/completions", {**COMP, "n": 0}, AUTH, 422),
    ("n over the server's limit", "/v1/completions", {**COMP, "n": 3}, AUTH, 400),
    ("unknown memory policy", "/v1/chat/completions", {**CHAT, "memgen": {"memory": "sometimes"}}, AUTH, 422),
    ("unknown memgen field", "/v1/chat/completions", {**CHAT, "memgen": {"weave_harder": True}}, AUTH, 422),
    ("negative max_insertions", "/v1/completions", {**COMP, "memgen": {"max_insertions": -1}}, AUTH, 422),
    ("five stop strings", "/v1/completions", {**COMP, "stop": ["a", "b", "c", "d", "e"]}, AUTH, 422),
    ("negative seed", "/v1/completions", {**COMP, "seed": -1}, AUTH, 422),
    ("logprobs 50", "/v1/completions", {**COMP, "logprobs": 50}, AUTH, 422),
    ("prompt over max_prompt_tokens", "/v1/completions", {**COMP, "prompt": "a b " * 60}, AUTH, 413),
    ("body over max_body_bytes", "/v1/completions", {**COMP, "prompt": "x" * 30000}, AUTH, 413),
    ("presence_penalty", "/v1/completions", {**COMP, "presence_penalty": 1.0}, AUTH, 400),
    ("echo", "/v1/completions", {**COMP, "echo": True}, AUTH, 400),
    ("empty prompt", "/v1/completions", {**COMP, "prompt": ""}, AUTH, 400),
    ("token id outside the vocabulary", "/v1/completions", {**COMP, "prompt": [1, 2, 10**7]}, AUTH, 400),
    ("unknown route", "/v1/embeddings", COMP, AUTH, 404),
]


def test_bad_requests_get_their_status_and_the_server_keeps_serving(strict_server):
    for what, path, body, headers, status in BAD_REQUESTS:
        code, reply = strict_server.post(path, body, headers)
        assert code == status, f"{what}: {code} {reply}"
        error = reply["error"]
        assert error["message"] and error["type"] and error["code"] == status, what
        assert strict_server.get("/health")[0] == 200, what
    with pytest.raises(openai.AuthenticationError):
        strict_server.client("nope").chat.completions.create(**CHAT)
    with pytest.raises(openai.UnprocessableEntityError):
        strict_server.client(KEY).chat.completions.create(**{**CHAT, "messages": []})
    good = strict_server.client(KEY).chat.completions.create(**CHAT)
    assert good.usage.completion_tokens >= 1


def test_a_full_queue_answers_429_and_recovers(strict_server):
    client = strict_server.client(KEY)
    long = dict(model="base", prompt="e m e, a.", max_tokens=600, temperature=0, n=2)
    stream = client.completions.create(stream=True, **long)
    next(iter(stream))  # both rows are now taken and the queue holds nothing
    with pytest.raises(openai.RateLimitError):
        client.completions.create(**COMP)
    stream.close()
    deadline = time.time() + 30
    while strict_server.metric("memgen_running_rows") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert client.completions.create(**COMP).usage.completion_tokens >= 1


def test_sigterm_finishes_admitted_requests_then_exits(tiny_dirs):
    root, base, adapter = tiny_dirs
    srv = Server(root, ["--model", base, "--adapter", adapter], name="drain")
    client = srv.client()
    jobs = [
        dict(model="base", prompt=p, max_tokens=300 + 20 * i, temperature=0)
        for i, p in enumerate(["a", "e m", "Hello, world.", "the mat"])
    ]
    alone = [client.completions.create(**job).choices[0].text for job in jobs]
    results = {}

    def run(i):
        job = jobs[i]
        if i % 2:
            stream = srv.client().completions.create(stream=True, **job)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        else:
            results[i] = srv.client().completions.create(**job).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    admitted = srv.metric("memgen_requests_total") + len(jobs)
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while (
        srv.metric("memgen_requests_total") < admitted or srv.metric("memgen_running_rows") == 0
    ) and time.time() < deadline:
        time.sleep(0.02)
    assert srv.metric("memgen_requests_finished_total") < admitted, "the requests finished before SIGTERM"
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert srv.proc.wait(60) == 0
    assert results == dict(enumerate(alone))
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(**jobs[0])


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    """The real model, started as the serving guide starts it."""
    from memgen.loading import packaged_smollm2

    root = tmp_path_factory.mktemp("smollm2")
    srv = Server(root, ["--model", packaged_smollm2()], "--served-model-name", "smollm2", "--memory", "always")
    yield srv
    srv.stop()


def test_real_model_greedy_chat_equals_memgen_generate(smollm2_server):
    from memgen.loading import packaged_smollm2

    question = "What is the capital of France? Answer in one word."
    chat = smollm2_server.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": question}],
        max_tokens=16,
        temperature=0,
        extra_body={"memgen": {"memory": "off"}},
    )
    out = subprocess.run(
        [sys.executable, "-m", "memgen", "generate", "--model", packaged_smollm2(), "--prompt", question, "--json"]
        + ["--memory", "off", "--max-new-tokens", "16", "--use-chat-template"],
        capture_output=True,
        text=True,
        check=True,
    )
    want = json.loads(out.stdout.strip().splitlines()[-1])
    assert chat.choices[0].message.content == want["text"]
    assert "Paris" in want["text"]


def guide_blocks(language: str) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "serving.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_serving_guide_examples_work_as_written(smollm2_server, tok):
    port = str(smollm2_server.port)
    start, curl = guide_blocks("bash")[:2]
    assert "--served-model-name smollm2 --memory always" in start  # the fixture's command
    if shutil.which("curl"):
        done = subprocess.run(["bash", "-c", curl.replace("8000", port)], capture_output=True, text=True, check=True)
        reply = json.loads(done.stdout)
        assert reply["choices"][0]["message"]["content"] and "insertions" in reply["choices"][0]["memgen"]
    client_example, engine_example = guide_blocks("python")
    done = subprocess.run(
        [sys.executable, "-c", client_example.replace("8000", port)], capture_output=True, text=True, check=True
    )
    assert "latent_slots" in done.stdout and "'position': 0" in done.stdout
    namespace = {"model": make_memgen(tok)}
    exec(engine_example, namespace)
    assert namespace["first"].result()[0].insertions and not namespace["second"].result()[0].insertions
