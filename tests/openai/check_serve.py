#!/usr/bin/env python3
"""Checks a running `cleave serve` through the official `openai` client and raw HTTP.

Run by crates/cli/tests/serve.rs, which starts the deployments:
  --url: a disaggregated deployment (1 prefill + 1 decode worker, tiny preset, remote prefill from 64 tokens),
  --aggregated-url: the same model on one aggregated worker, to compare greedy tokens with,
  --pid: the disaggregated `cleave serve` process, sent SIGINT at the end to check it drains.
Each check prints its name; the first failure raises and the script exits non-zero.
"""

import argparse
import json
import os
import re
import signal
import threading
import time

import httpx
import openai

MODEL = "tiny"
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def metrics(url):
    """The /metrics exposition as {"name{labels}": value}."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def metric_sum(m, name, **labels):
    total = 0.0
    for key, value in m.items():
        if key == name or key.startswith(name + "{"):
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
    return total


def wait_until(predicate, what, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(url):
    r = httpx.get(f"{url}/health")
    assert r.status_code == 200, f"server unhealthy after a bad request: {r.status_code} {r.text}"


@check
def models_lists_the_served_model(ctx):
    models = ctx.client.models.list()
    assert [m.id for m in models.data] == [MODEL], models


@check
def completion_and_usage(ctx):
    r = ctx.client.completions.create(model=MODEL, prompt="Hello, world", max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "length", choice
    # The byte tokenizer: one token per byte plus BOS.
    assert r.usage.prompt_tokens == len("Hello, world") + 1, r.usage
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12, r.usage


@check
def token_id_prompts_equal_text_prompts(ctx):
    ids = [256] + list(b"Hello, world")
    a = ctx.client.completions.create(model=MODEL, prompt="Hello, world", max_tokens=8, temperature=0)
    b = ctx.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text


@check
def streaming_equals_non_streaming_and_counts_tokens(ctx):
    kwargs = dict(model=MODEL, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = ctx.client.chat.completions.create(messages=[{"role": "user", "content": "Tell me a story"}], **kwargs)
    stream = ctx.client.chat.completions.create(messages=[{"role": "user", "content": "Tell me a story"}],
                                                stream=True, stream_options={"include_usage": True}, **kwargs)
    text, usage, finish, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles == ["assistant"], roles
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    assert finish == "length" and whole.choices[0].finish_reason == "length"
    assert usage is not None and usage.completion_tokens == 20, usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens


@check
def continuous_usage_counts_every_token(ctx):
    stream = ctx.client.completions.create(model=MODEL, prompt="abc", max_tokens=9, stream=True,
                                           stream_options={"include_usage": True, "continuous_usage_stats": True},
                                           extra_body={"ignore_eos": True})
    counts = [chunk.usage.completion_tokens for chunk in stream if chunk.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 9, counts


@check
def disaggregated_tokens_equal_aggregated(ctx):
    # Short prompts are prefilled on the decode worker, long ones (>= 64 tokens) on the prefill worker; a repeated
    # prompt hits the prefix cache. Greedy tokens must match the aggregated deployment's exactly.
    before = metric_sum(metrics(ctx.url), "cleave_prefill_decisions_total", decision="remote")
    prompts = ["short one", "x" * 200, "The quick brown fox " * 20, "x" * 200 + " and more"]
    for prompt in prompts:
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        a = ctx.client.completions.create(**kwargs).choices[0].text
        b = ctx.aggregated.completions.create(**kwargs).choices[0].text
        assert a == b, (prompt[:20], a, b)
    m = metrics(ctx.url)
    remote = metric_sum(m, "cleave_prefill_decisions_total", decision="remote") - before
    assert remote >= 2, f"expected remote prefills, got {remote}"
    assert metric_sum(m, "cleave_kv_transfer_bytes_total", role="decode") > 0
    assert metric_sum(m, "cleave_cached_prompt_tokens_total") > 0, "the repeated prefix should hit the cache"


@check
def seeded_sampling_is_reproducible_and_stop_strings_stop(ctx):
    kwargs = dict(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, top_p=0.9, seed=7,
                  extra_body={"top_k": 50, "ignore_eos": True})
    a = ctx.client.completions.create(**kwargs).choices[0].text
    b = ctx.client.completions.create(**kwargs).choices[0].text
    assert a == b
    greedy = ctx.client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text
    visible = [c for c in greedy[2:] if c.isprintable() and c != "\ufffd"]
    if visible:
        stop = visible[0]
        r = ctx.client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text, r


@check
def min_tokens_is_honoured(ctx):
    r = ctx.client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, temperature=0,
                                      extra_body={"min_tokens": 10})
    assert r.usage.completion_tokens == 10, r.usage


def expect_error(ctx, status, body, *, path="/v1/chat/completions", headers=None, content=None):
    r = httpx.post(f"{ctx.url}{path}", json=body if content is None else None, content=content,
                   headers=headers or {"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, (status, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["message"] and error["type"], error
    healthy(ctx.url)
    return error


@check
def bad_requests_get_openai_errors_and_the_server_stays_up(ctx):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    expect_error(ctx, 400, None, content=b'{"model": "tiny", "messages": [')
    e = expect_error(ctx, 400, {**chat, "max_tokens": "four"})
    assert e["param"] == "max_tokens", e
    expect_error(ctx, 400, {**chat, "messages": "hi"})
    expect_error(ctx, 400, {**chat, "max_tokens": -3})
    e = expect_error(ctx, 400, {**chat, "max_tokens": 10**9})
    assert "max_tokens" in e["message"], e
    expect_error(ctx, 400, {**chat, "messages": []})
    expect_error(ctx, 400, {**chat, "temperature": 5})
    expect_error(ctx, 400, None, content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    expect_error(ctx, 413, None, content=b'{"model": "tiny", "prompt": "' + b"a" * (10 << 20) + b'"}',
                 path="/v1/completions")
    expect_error(ctx, 404, {**chat, "model": "gpt-4"})
    expect_error(ctx, 400, {"model": MODEL, "prompt": "x" * 5000, "max_tokens": 4}, path="/v1/completions")
    expect_error(ctx, 400, {"model": MODEL, "prompt": [1, 2, 99999999], "max_tokens": 4}, path="/v1/completions")
    # The official client maps them to its exceptions.
    try:
        ctx.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        ctx.client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
        raise AssertionError("negative max_tokens accepted")
    except openai.BadRequestError:
        pass


@check
def a_client_that_disconnects_frees_its_blocks(ctx):
    m = metrics(ctx.url)
    cancelled_before = metric_sum(m, "cleave_requests_total", outcome="cancelled")
    with httpx.stream("POST", f"{ctx.url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "y" * 300, "max_tokens": 1500, "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
        blocks = metric_sum(metrics(ctx.url), "cleave_worker_kv_blocks_active")
        assert blocks > 0, "a running request holds blocks"
    # The connection is closed: the request must be cancelled and every block returned.
    wait_until(lambda: metric_sum(metrics(ctx.url), "cleave_worker_kv_blocks_active") == 0
               and metric_sum(metrics(ctx.url), "cleave_requests_total", outcome="cancelled") > cancelled_before,
               "blocks freed after the client disconnected")


@check
def metrics_are_prometheus_text_with_documented_names(ctx):
    text = httpx.get(f"{ctx.url}/metrics").text
    for name in ["cleave_time_to_first_token_seconds_bucket", "cleave_inter_token_latency_seconds_bucket",
                 "cleave_e2e_request_latency_seconds_bucket", "cleave_requests_total", "cleave_requests_in_flight",
                 "cleave_worker_kv_blocks_active", "cleave_worker_queued_prefill_tokens",
                 "cleave_prefill_decisions_total", "cleave_kv_transfer_bytes_total",
                 "cleave_cached_prompt_tokens_total"]:
        assert re.search(rf"^{name}", text, re.M), f"{name} missing from /metrics"


@check
def sigint_drains_in_flight_requests_then_exits(ctx):
    result = {}

    def stream():
        r = ctx.client.completions.create(model=MODEL, prompt="drain me", max_tokens=300, stream=True,
                                          extra_body={"ignore_eos": True})
        result["text"] = "".join(c.choices[0].text for c in r if c.choices)
        result["done"] = True

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: metric_sum(metrics(ctx.url), "cleave_requests_in_flight") >= 1, "the request to start")
    os.kill(ctx.pid, signal.SIGINT)
    t.join(60)
    assert result.get("done"), "the in-flight request did not complete during the drain"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--aggregated-url", required=True)
    parser.add_argument("--pid", type=int, required=True)
    args = parser.parse_args()

    class Ctx:
        url = args.url
        pid = args.pid
        client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="none", max_retries=0)
        aggregated = openai.OpenAI(base_url=f"{args.aggregated_url}/v1", api_key="none", max_retries=0)

    for fn in CHECKS:
        fn(Ctx)
        print(f"ok {fn.__name__}", flush=True)


if __name__ == "__main__":
    main()
