"""A bad flag value is a usage error: one line naming the flag on stderr, exit status 2, no traceback."""

from __future__ import annotations

import pytest

from tools.cli import main

CASES = [
    (["llm", "--model", "{model}", "--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
    (["llm", "--model", "{model}", "--kv-cache-budget-mb", "-1"], "--kv-cache-budget-mb must be >= 0"),
    (["llm", "--model", "{model}", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["vision", "--model", "{model}", "--port", "0", "--max-batch-tiles", "0"], "--max-batch-tiles must be >= 1"),
    (["vision", "--model", "{model}", "--port", "0", "--drain-seconds", "-1"], "--drain-seconds must be >= 0"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--session-ttl-s", "0"],
     "--session-ttl-s must be >= 1, got 0"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--media-root", "/nonexistent"],
     "--media-root '/nonexistent' is not a directory"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--vision-attempt-timeout-s", "0"],
     "--vision-attempt-timeout-s must be > 0, got 0"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--circuit-failure-threshold", "0"],
     "--circuit-failure-threshold must be >= 1, got 0"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--circuit-cooldown-s", "-1"],
     "--circuit-cooldown-s must be >= 0, got -1"),
    (["up", "--model", "{model}", "--vision-replicas", "0"], "--vision-replicas must be >= 1"),
    (["up", "--model", "{model}", "--llm-replicas", "0"], "--llm-replicas must be >= 1"),
    (["up", "--model", "{model}", "--redis-cluster", "2"], "--redis-cluster needs at least 3 masters"),
    (["up", "--model", "{model}", "--redis-cluster-replicas", "1"], "--redis-cluster-replicas goes with"),
    # A service's own flag set on `up` is checked by the service's config before anything starts.
    (["up", "--model", "{model}", "--max-request-tiles", "0"], "--max-request-tiles must be >= 1, got 0"),
    (["up", "--model", "{model}", "--lora", "a=/x", "--lora", "a=/y"], "--lora names must be unique, a repeats"),
    (["vision", "--model", "{model}", "--port", "0", "--redis-url", "redis+cluster://h:x"], "--redis-url: bad node 'h:x'"),
    (["llm", "--model", "{model}", "--redis-url", "redis+cluster://h:1/2"], "--redis-url: a Redis Cluster has only"),
    (["llm", "--model", "{model}", "--redis-url", "http://h:1"], "--redis-url: Redis URL must specify"),
    (["bench", "--quick", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    # The request limits (issue 25): each named with its value.
    (["llm", "--model", "{model}", "--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1, got 0"),
    (["llm", "--model", "{model}", "--grammar-compile-timeout-s", "0"], "--grammar-compile-timeout-s must be in (0, 600]"),
    (["llm", "--model", "{model}", "--max-constraint-choices", "0"], "--max-constraint-choices must be >= 1, got 0"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--max-media-items", "0"],
     "--max-media-items must be >= 1, got 0"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--max-conversation-media-items", "8"],
     "--max-conversation-media-items (8) must be >= --max-media-items (32)"),
    (["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--max-stop-string-chars", "0"],
     "--max-stop-string-chars must be >= 1, got 0"),
    # Shared by the gateway and the LLM service: `up` passes it to both, each checks it.
    (["up", "--model", "{model}", "--max-n", "0"], "--max-n must be >= 1, got 0"),
    (["up", "--model", "{model}", "--max-logit-bias", "-1"], "--max-logit-bias must be >= 1, got -1"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_flag_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = main([a.format(model=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"internvl-serve {argv[0]}: error: ")
    assert message in lines[0]


def test_a_bad_redis_url_is_a_usage_error_for_the_gateway_too(capsys):
    code = main(["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--redis-url", "foo://x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--redis-url:" in err and "redis+cluster://" in err
