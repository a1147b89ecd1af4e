"""Three appliances on loopback behind a real HAProxy running the config `llm-appliance fleet
haproxy --query` wrote, driven with the official openai client through HAProxy.

Each box is a real daemon (the default model on CPU, a few sequences, a small KV cache) with its
agent check on; HAProxy names the box that answered in X-Served-By; prefix-cache figures come
from each box's own /metrics; HAProxy's view of each box from its runtime API."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from appliance_bench.fleet import API_KEY, LocalFleet, haproxy_binary

pytestmark = pytest.mark.skipif(haproxy_binary() is None,
                                reason="haproxy is not installed (.ci/run installs Debian's package)")

CHECK_INTERVAL_S = 1.0
# Long enough for several full KV blocks (16 tokens each) shared by every request that uses it.
SYSTEM_A = ("You are the support assistant of the Harbor Street lending library. Answer in one short "
            "sentence. The library opens at nine and closes at six, lends up to eight books for three "
            "weeks, renews once by phone, charges no late fees for children, and keeps a reading room "
            "with maps, newspapers and a quiet corner for study groups on the second floor.")
SYSTEM_B = ("You are a careful assistant for a bicycle repair shop. Explain repairs step by step, name "
            "the tools needed, warn about brakes and gears, and suggest when a rider should visit the shop.")
SYSTEM_C = ("You are a tutor of elementary arithmetic for children aged seven to nine. Use small numbers, "
            "friendly words, one example per answer, and never more than three sentences.")


@pytest.fixture(scope="module")
def fleet() -> Iterator[LocalFleet]:
    workdir = Path(tempfile.mkdtemp(prefix="llma-fleet-", dir="/tmp"))  # short: Unix socket paths
    local = LocalFleet(workdir, 3, max_num_seqs=4, max_model_len=512, check_interval_s=CHECK_INTERVAL_S)
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class Api:
    """The official openai client, pointed at HAProxy."""

    def __init__(self, client: openai.OpenAI, model: str) -> None:
        self.client = client
        self.model = model

    def ask(self, system: str | None, question: str, max_tokens: int = 2) -> str:
        """One chat request through HAProxy; returns the box that answered it."""
        messages = [{"role": "system", "content": system}] if system else []
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=[*messages, {"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0.0)
        assert raw.parse().choices[0].finish_reason in ("length", "stop")
        return raw.headers["x-served-by"]


@pytest.fixture(scope="module")
def model(fleet: LocalFleet) -> str:
    # Asked once, of one box: a GET has no prompt to hash, so through HAProxy it could reach a box
    # a test has frozen.
    with openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.boxes[0].http_port}/v1", api_key=API_KEY) as c:
        return c.models.list().data[0].id


@pytest.fixture
def api(fleet: LocalFleet, model: str) -> Iterator[Api]:
    """A client of HAProxy. Afterwards every box is made whole again (running, resumed, UP), so a
    failed test does not fail the next one."""
    # max_retries=0: every retry seen here is HAProxy's, not the SDK's.
    with openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as client:
        yield Api(client, model)
    for box in fleet.boxes:
        if box.proc is None or box.proc.poll() is not None:
            box.start()
            box.wait_ready()
        box.signal(signal.SIGCONT)
        box.ctl("resume")
    fleet.wait_until(lambda s: all(s[b.name]["status"] == "UP" for b in fleet.boxes), 60, "every box UP")


def hits(fleet: LocalFleet) -> dict[str, float]:
    return {b.name: b.metrics()["vllm:prefix_cache_hits_total"] for b in fleet.boxes}


def prompt_tokens(fleet: LocalFleet) -> dict[str, float]:
    return {b.name: b.metrics()["vllm:prompt_tokens_total"] for b in fleet.boxes}


def test_requests_sharing_a_system_prompt_land_on_one_box_and_hit_its_prefix_cache(
        fleet: LocalFleet, api: Api) -> None:
    hits_before, computed_before = hits(fleet), prompt_tokens(fleet)
    served = [api.ask(SYSTEM_A, f"Question {i}: can I borrow a map?") for i in range(5)]
    assert len(set(served)) == 1, served
    home = served[0]
    hits_after, computed_after = hits(fleet), prompt_tokens(fleet)
    # The four requests after the first found the system prompt's blocks cached (>= 4 blocks each).
    assert hits_after[home] - hits_before[home] >= 4 * 4 * 16
    for name in hits_after:
        if name != home:
            assert computed_after[name] == computed_before[name], f"{name} computed a prompt"
    # The API key is checked by the box behind HAProxy, and a refusal is not retried elsewhere.
    with openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model=api.model, max_tokens=1,
                                             messages=[{"role": "user", "content": "hello"}])


def test_each_box_limit_comes_from_its_max_num_seqs(fleet: LocalFleet, api: Api) -> None:
    # `fleet haproxy --query` asked each box's agent check; HAProxy applies the same limit live.
    config = fleet.config_path.read_text()
    for box in fleet.boxes:
        assert f"server {box.name} 127.0.0.1:{box.http_port} agent-port {box.agent_port} maxconn 4 " in config
    assert {s["maxconn"] for s in fleet.server_states().values()} == {4}


def test_different_prompts_spread_over_all_three_boxes(fleet: LocalFleet, api: Api) -> None:
    served = [api.ask(None, f"Topic {i}: name one colour of the {word} sky.", max_tokens=1)
              for i, word in enumerate(["morning", "evening", "winter", "summer", "stormy", "northern"] * 4)]
    assert set(served) == {b.name for b in fleet.boxes}, served


def test_drain_moves_new_requests_off_a_box_while_its_stream_finishes(
        fleet: LocalFleet, api: Api) -> None:
    home = api.ask(SYSTEM_A, "When do you open?")
    box = fleet.box(home)
    raw = api.client.chat.completions.with_raw_response.create(
        model=api.model, max_tokens=32, temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": "Tell me about the reading room."}])
    assert raw.headers["x-served-by"] == home
    stream = iter(raw.parse())
    first = next(stream)  # the stream is under way: its first chunk came through HAProxy
    assert first.choices[0].delta is not None
    assert json.loads(box.ctl("--json", "status").stdout)["inflight"] == 1

    assert box.ctl("drain").returncode == 0
    # At once (before HAProxy has asked the agent): the box answers 503 and HAProxy retries elsewhere.
    assert api.ask(SYSTEM_A, "Right after the drain: is the library open?") != home
    fleet.wait_until(lambda s: s[home]["status"].startswith("DRAIN"), 10 * CHECK_INTERVAL_S, f"{home} in DRAIN")
    elsewhere = {api.ask(SYSTEM_A, f"While drained {i}: how many books?") for i in range(3)}
    assert home not in elsewhere and len(elsewhere) == 1, elsewhere

    rest = list(stream)  # the stream started before the drain finishes on the drained box
    usage = rest[-1].usage
    assert usage is not None and usage.completion_tokens == 32
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"

    assert box.ctl("resume").returncode == 0
    fleet.wait_until(lambda s: s[home]["status"] == "UP", 10 * CHECK_INTERVAL_S, f"{home} UP again")
    assert api.ask(SYSTEM_A, "After the resume: where are the maps?") == home  # its prefixes come back


def test_a_loaded_box_gets_less_weight_and_its_weight_back_when_idle(fleet: LocalFleet, api: Api) -> None:
    box = fleet.boxes[2]
    words = "river stone market lantern orbit violet cedar harbor signal meadow copper thunder".split()

    def long_stream(seed: int) -> None:
        # Sent to the box itself (not through HAProxy): the load is the box's, HAProxy only hears
        # of it from the agent check. ~440 prompt tokens + 40 generated: ~30 of the 68 KV blocks.
        prompt = " ".join(words[(seed * 7 + i * 5) % len(words)] + str(i % 10) for i in range(210))
        with openai.OpenAI(base_url=f"http://127.0.0.1:{box.http_port}/v1", api_key=API_KEY,
                           max_retries=0, timeout=600) as direct:
            stream = direct.completions.create(model=api.model, prompt=prompt, max_tokens=40, stream=True,
                                               extra_body={"ignore_eos": True})
            assert sum(1 for _ in stream) > 0

    threads = [threading.Thread(target=long_stream, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    try:
        # Two such sequences hold most of the cache: the agent lowers the weight it reports.
        loaded = fleet.wait_until(lambda s: s[box.name]["weight"] < 100, 120, f"{box.name} weighted down")
        assert loaded[box.name]["status"] == "UP"
    finally:
        for t in threads:
            t.join(600)
    fleet.wait_until(lambda s: s[box.name]["weight"] == 100, 10 * CHECK_INTERVAL_S, f"{box.name} at full weight")


def test_killing_a_box_loses_no_request_that_had_not_started_streaming(
        fleet: LocalFleet, api: Api) -> None:
    home = api.ask(SYSTEM_B, "How do I fix a flat tyre?")
    box = fleet.box(home)
    # Freeze the box so the requests below are certainly sent to it and certainly not answered yet.
    box.signal(signal.SIGSTOP)
    results: dict[int, str | BaseException] = {}

    def send(i: int) -> None:
        try:
            results[i] = api.ask(SYSTEM_B, f"Killed box {i}: which spanner for the pedals?")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    # All three hash to the frozen box; bounded load (no box above 150% of the average in flight)
    # may send some of them to another box at once, but the first always goes to it.
    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    retried_before = fleet.wait_until(lambda s: s[home]["current"] >= 1, 10,
                                      f"a request in flight on {home}")[home]["retried"]
    box.signal(signal.SIGKILL)
    assert box.proc is not None and box.proc.wait(30) == -signal.SIGKILL
    for t in threads:
        t.join(120)
    assert all(isinstance(r, str) and r != home for r in results.values()), results
    assert len(results) == 3
    assert fleet.server_states()[home]["retried"] > retried_before  # HAProxy's retry, not luck

    fleet.wait_until(lambda s: s[home]["status"].startswith("DOWN"), 10 * CHECK_INTERVAL_S, f"{home} DOWN")
    served = {api.ask(None, f"After the kill {i}: say a number.", max_tokens=1) for i in range(6)}
    assert home not in served and served, served

    # Restarted (as after a .deb upgrade), the box rejoins and gets its prefixes back.
    box.start()
    box.wait_ready()
    fleet.wait_until(lambda s: s[home]["status"] == "UP", 20 * CHECK_INTERVAL_S, f"{home} UP after a restart")
    assert api.ask(SYSTEM_B, "Back again: how tight should the chain be?") == home


def test_a_hung_box_leaves_the_pool_within_the_health_check_interval(
        fleet: LocalFleet, api: Api) -> None:
    home = api.ask(SYSTEM_C, "What is two plus three?")
    box = fleet.box(home)
    box.signal(signal.SIGSTOP)  # the whole daemon hangs: its port still accepts, nothing answers
    # fall (2) checks, each given `timeout check` (1 s), one interval apart; slack for a busy CI box.
    fleet.wait_until(lambda s: s[home]["status"].startswith("DOWN"), 2 * (2 * CHECK_INTERVAL_S) + 6,
                     f"{home} DOWN while hung")
    served = {api.ask(SYSTEM_C, f"While hung {i}: what is four minus one?") for i in range(3)}
    assert home not in served, served
    box.signal(signal.SIGCONT)
    fleet.wait_until(lambda s: s[home]["status"] == "UP", 20 * CHECK_INTERVAL_S, f"{home} UP after SIGCONT")
